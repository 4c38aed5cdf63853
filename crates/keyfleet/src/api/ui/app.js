// keyfleet's operators' dashboard: plain DOM, no framework, no build step. Every value from the
// API is put in the page as text (never as HTML). The token lives in sessionStorage only and is
// sent as `Authorization: Bearer` on each call; a viewer token gets no action controls at all.
"use strict";

const TOKEN_KEY = "keyfleet.token";
const POLL_MS = 2000;
const KIND_COLOURS = {
  create_key: "#2f6fdf", delete_key: "#c2410c", sync_config: "#15803d",
  reconcile: "#7e22ce", collect_traffic: "#a16207",
};

const state = { token: null, me: null, timer: null, page: null, rows: new Map() };

// ---------------------------------------------------------------- helpers

/** Builds an element: attributes (on* are listeners, `class`, `data-*`, others as attributes),
 *  then children (strings become text nodes; null/false are skipped). */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "value") el.value = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

/** Replaces an element's children (as `append`). */
function put(el, ...children) {
  el.replaceChildren();
  append(el, children);
}

/** Appends children as `h` does: strings as text, null/false skipped, arrays flattened. */
function append(el, ...children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const isAdmin = () => state.me && state.me.role === "admin";

/** An action control: rendered for admins only, so a viewer's page has none. */
function action(label, name, onclick, extra) {
  if (!isAdmin()) return null;
  return h("button", Object.assign({ type: "button", "data-action": name, onclick }, extra || {}), label);
}

function fmtMs(ms) {
  if (ms === null || ms === undefined) return "–";
  return ms < 10 ? ms.toFixed(1) + " ms" : ms < 10000 ? Math.round(ms) + " ms" : (ms / 1000).toFixed(1) + " s";
}

function fmtBytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function fmtTime(t) {
  if (!t) return "–";
  const d = new Date(t);
  return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function ago(t) {
  if (!t) return "never";
  const s = Math.round((Date.now() - new Date(t).getTime()) / 1000);
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}

let toastTimer = null;
function toast(text, bad) {
  const el = document.getElementById("toast");
  el.textContent = text;
  el.className = bad ? "show bad" : "show";
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { el.className = ""; }, 4000);
}

class ApiError extends Error {
  constructor(status, body) {
    const e = body && body.error;
    super(e ? (e.field ? e.field + ": " : "") + e.message : "HTTP " + status);
    this.status = status;
  }
}

/** Calls the API with the session's token; a 401 signs out. */
async function api(method, path, body) {
  const init = { method, headers: { Authorization: "Bearer " + state.token }, cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (res.status === 401) { signOut("Your token was refused: sign in again."); throw new ApiError(401, data); }
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

/** Runs an action, reports the outcome, refreshes the page. */
async function run(what, fn) {
  try {
    const msg = await fn();
    toast(msg || what + ": done");
  } catch (e) {
    toast(what + " failed: " + e.message, true);
  }
  refresh();
}

async function copy(text) {
  try {
    await navigator.clipboard.writeText(text);
    toast("Copied");
  } catch (_) {
    const area = h("textarea", { class: "offscreen", readonly: true });
    area.value = text;
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    toast(ok ? "Copied" : "Copy it by hand: the browser refused", !ok);
  }
}

// ---------------------------------------------------------------- sign-in and routing

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null;
  state.me = null;
  stopPolling();
  document.getElementById("top").hidden = true;
  document.getElementById("app").hidden = true;
  document.getElementById("app").replaceChildren();
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
  document.getElementById("token").value = "";
}

async function signIn(token) {
  state.token = token;
  let me;
  try {
    me = await api("GET", "/v1/me");
  } catch (e) {
    if (e.status !== 401) signOut("Cannot sign in: " + e.message);
    return;
  }
  if (me.role === "producer") {
    signOut("A producer token cannot use the dashboard: use an admin or viewer token.");
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  state.me = me;
  document.body.dataset.role = me.role;
  document.getElementById("who").textContent = me.name + " (" + me.role + ")";
  document.getElementById("login").hidden = true;
  document.getElementById("top").hidden = false;
  document.getElementById("app").hidden = false;
  route();
}

function stopPolling() {
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
}

const PAGES = {};
let refresh = () => {};

function route() {
  if (!state.me) return;
  const hash = location.hash.replace(/^#\/?/, "");
  const [name, ...rest] = hash.split("/");
  const page = PAGES[name] ? name : "fleet";
  const arg = rest.map(decodeURIComponent).join("/");
  stopPolling();
  state.page = page;
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("current", a.dataset.page === page);
  }
  const main = document.getElementById("app");
  const root = h("section", { id: "page-" + page, class: "page" });
  put(main, root);
  const p = PAGES[page](root, arg);
  refresh = () => { p.load().catch(showLoadError(root)); };
  refresh();
  if (p.live) state.timer = setInterval(refresh, POLL_MS);
}

function showLoadError(root) {
  return (e) => {
    if (e.status === 401) return;
    let el = root.querySelector(".load-error");
    if (!el) { el = h("p", { class: "error load-error" }); root.prepend(el); }
    el.textContent = "Cannot load: " + e.message;
  };
}

function clearLoadError(root) {
  const el = root.querySelector(".load-error");
  if (el) el.remove();
}

// ---------------------------------------------------------------- fleet

PAGES.fleet = (root) => {
  const summary = h("p", { class: "summary" });
  const columns = [
    ["name", "Server"], ["kind", "Kind"], ["active", "Active"], ["limit", "Limit"],
    ["in_flight", "In flight"], ["ready", "Ready"], ["delayed", "Delayed"], ["dead", "Dead"],
    ["breaker", "Breaker"], ["p50", "p50"], ["p99", "p99"], ["errors", "Errors"],
    ["keys", "Keys"], ["health", "Health"],
  ];
  const head = h("tr", {}, columns.map(([, t]) => h("th", {}, t)), isAdmin() ? h("th", {}, "Actions") : null);
  const body = h("tbody");
  const since = h("p", { class: "muted" });
  append(root, h("h2", {}, "Fleet"), summary, h("table", { class: "grid fleet" }, h("thead", {}, head), body), since);
  const rows = new Map();

  function actions(name) {
    if (!isAdmin()) return null;
    const limit = h("input", { type: "number", min: 1, max: 1000, class: "limit", "data-action": "limit-input", "aria-label": "new limit for " + name });
    const path = "/v1/servers/" + encodeURIComponent(name);
    const cell = h("td", { class: "actions" },
      h("span", { class: "inline" }, limit,
        action("Set limit", "set-limit", () => run("Set limit of " + name, async () => {
          const n = Number(limit.value);
          if (!Number.isInteger(n) || n < 1 || n > 1000) throw new Error("the limit is a whole number from 1 to 1000");
          await api("PATCH", path, { max_in_flight: n });
          limit.value = "";
          return name + ": limit " + n;
        }))),
      action("Pause", "pause", () => run("Pause " + name, async () => {
        await api("POST", path + "/pause");
        return name + " paused: no new claims";
      })),
      action("Resume", "resume", () => run("Resume " + name, async () => {
        await api("POST", path + "/resume");
        return name + " resumed";
      })),
      action("Bump config", "bump-config", () => run("Bump config of " + name, async () => {
        const r = await api("POST", path + "/bump-config");
        return name + ": config generation " + r.config_generation + "; the next config sweep re-fetches its links";
      })),
      action("Reconcile now", "reconcile", () => run("Reconcile " + name, async () => {
        const r = await api("POST", "/v1/sweeps/reconcile?server=" + encodeURIComponent(name));
        return "Reconcile of " + name + ": " + r.enqueued + " job(s) enqueued";
      })),
      action("Deactivate", "deactivate", (ev) => {
        const b = ev.currentTarget;
        if (b.dataset.armed !== "yes") {
          b.dataset.armed = "yes";
          b.textContent = "Really deactivate?";
          setTimeout(() => { b.dataset.armed = ""; b.textContent = "Deactivate"; }, 4000);
          return;
        }
        run("Deactivate " + name, async () => {
          await api("PATCH", path, { active: false });
          return name + " deactivated: it gets no new keys";
        });
      }),
      action("Activate", "activate", () => run("Activate " + name, async () => {
        await api("PATCH", path, { active: true });
        return name + " active again";
      })),
    );
    return cell;
  }

  function rowFor(name) {
    let r = rows.get(name);
    if (r) return r;
    const cells = {};
    const tr = h("tr", { "data-server": name });
    for (const [key] of columns) {
      cells[key] = h("td", { "data-col": key });
      tr.append(cells[key]);
    }
    const acts = actions(name);
    if (acts) tr.append(acts);
    r = { tr, cells, acts };
    rows.set(name, r);
    body.append(tr);
    return r;
  }

  return {
    live: true,
    async load() {
      const f = await api("GET", "/v1/fleet");
      clearLoadError(root);
      const seen = new Set();
      let trouble = 0, warn = 0, ready = 0, inflight = 0, dead = 0;
      for (const s of f.servers) {
        seen.add(s.name);
        const r = rowFor(s.name);
        const c = r.cells;
        c.name.textContent = s.name;
        c.kind.textContent = s.kind;
        c.active.textContent = s.active ? "yes" : "no";
        c.limit.textContent = s.max_in_flight;
        c.in_flight.textContent = s.in_flight;
        c.ready.textContent = s.ready;
        c.delayed.textContent = s.delayed;
        c.dead.textContent = s.dead;
        c.breaker.textContent = s.breaker;
        c.breaker.className = "breaker-" + s.breaker;
        c.p50.textContent = fmtMs(s.p50_ms);
        c.p99.textContent = fmtMs(s.p99_ms);
        c.errors.textContent = s.requests ? (s.error_rate * 100).toFixed(1) + "% of " + s.requests : "–";
        c.keys.textContent = s.keys;
        put(c.health, h("span", { class: "badge " + s.health }, s.health));
        if (s.problems.length) c.health.append(h("span", { class: "problems" }, " " + s.problems.join("; ")));
        r.tr.className = "health-" + s.health + (s.paused ? " paused" : "") + (s.active ? "" : " inactive");
        if (r.acts) {
          r.acts.querySelector('[data-action="pause"]').hidden = s.paused;
          r.acts.querySelector('[data-action="resume"]').hidden = !s.paused;
          r.acts.querySelector('[data-action="deactivate"]').hidden = !s.active;
          r.acts.querySelector('[data-action="activate"]').hidden = s.active;
        }
        if (s.health === "trouble") trouble++;
        if (s.health === "warn") warn++;
        ready += s.ready; inflight += s.in_flight; dead += s.dead;
      }
      for (const [name, r] of rows) {
        if (!seen.has(name)) { r.tr.remove(); rows.delete(name); }
      }
      put(summary, 
        h("span", { class: "stat" }, h("b", {}, f.servers.length), " servers"),
        h("span", { class: "stat" + (trouble ? " bad" : "") }, h("b", {}, trouble), " in trouble"),
        h("span", { class: "stat" + (warn ? " warn" : "") }, h("b", {}, warn), " need a look"),
        h("span", { class: "stat" }, h("b", {}, ready), " ready"),
        h("span", { class: "stat" }, h("b", {}, inflight), " in flight"),
        h("span", { class: "stat" + (dead ? " warn" : "") }, h("b", {}, dead), " dead"),
      );
      since.textContent = "Latency and errors: requests since " + fmtTime(f.since) + " (all workers). Updated " + new Date().toLocaleTimeString() + ".";
    },
  };
};

// ---------------------------------------------------------------- queue

function lineChart(title, series, yFormat) {
  const W = 640, H = 200, L = 56, R = 12, T = 12, B = 28;
  const all = series.flatMap((s) => s.points.map((p) => p.y).filter((y) => y !== null));
  const max = Math.max(1, ...all);
  const n = Math.max(1, ...series.map((s) => s.points.length));
  const x = (i) => L + (n === 1 ? 0 : (i * (W - L - R)) / (n - 1));
  const y = (v) => T + (H - T - B) * (1 - v / max);
  const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title });
  for (let k = 0; k <= 4; k++) {
    const v = (max * k) / 4;
    g.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "gridline" }),
      svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", class: "axis" }, yFormat(v)));
  }
  g.append(svg("text", { x: L, y: H - 8, class: "axis" }, n + " min ago"),
    svg("text", { x: W - R, y: H - 8, "text-anchor": "end", class: "axis" }, "now"));
  for (const s of series) {
    let d = "";
    s.points.forEach((p, i) => {
      if (p.y === null) return;
      d += (d && s.points[i - 1] && s.points[i - 1].y !== null ? " L" : " M") + x(i).toFixed(1) + " " + y(p.y).toFixed(1);
    });
    if (d) g.append(svg("path", { d: d.trim(), fill: "none", stroke: s.colour, "stroke-width": 2, "stroke-dasharray": s.dashed ? "5 4" : "none", "data-series": s.name }));
    s.points.forEach((p, i) => {
      if (p.y !== null && p.y > 0) g.append(svg("circle", { cx: x(i).toFixed(1), cy: y(p.y).toFixed(1), r: 2.5, fill: s.colour }, svg("title", {}, s.name + ": " + yFormat(p.y))));
    });
  }
  const legend = h("div", { class: "legend" }, series.map((s) => {
    const swatch = h("i", { class: s.dashed ? "swatch dashed" : "swatch" });
    swatch.style.borderColor = s.colour;
    return h("span", {}, swatch, s.name);
  }));
  return h("figure", { class: "card" }, h("figcaption", {}, title), g, legend);
}

PAGES.queue = (root) => {
  const counts = h("div", { class: "counts" });
  const charts = h("div", { class: "charts" });
  const table = h("tbody");
  append(root, h("h2", {}, "Queue"), counts, charts,
    h("h3", {}, "By server"),
    h("table", { class: "grid" }, h("thead", {}, h("tr", {}, ["Server", "Ready", "Delayed", "Running", "Dead", "Limit", "Breaker", "Paused"].map((t) => h("th", {}, t)))), table));
  return {
    live: true,
    async load() {
      const [q, stats] = await Promise.all([api("GET", "/v1/queue"), api("GET", "/v1/stats/jobs?minutes=30")]);
      clearLoadError(root);
      put(counts, ...["ready", "delayed", "running", "dead"].map((k) =>
        h("div", { class: "count card", "data-state": k }, h("b", {}, q.totals[k]), h("span", {}, k))));
      put(table, ...q.servers.map((s) => h("tr", { "data-server": s.server || String(s.server_id) },
        h("td", {}, s.server || "#" + s.server_id), h("td", {}, s.ready), h("td", {}, s.delayed), h("td", {}, s.running),
        h("td", {}, s.dead), h("td", {}, s.limit === null ? "–" : s.limit), h("td", { class: "breaker-" + s.breaker }, s.breaker),
        h("td", {}, s.paused ? "paused" : ""))));
      const colour = (k) => KIND_COLOURS[k] || "#444";
      const throughput = stats.kinds.map((k) => ({
        name: k.kind, kind: k.kind, colour: colour(k.kind),
        points: k.points.map((p) => ({ y: p.done })),
      }));
      const latency = stats.kinds.flatMap((k) => [
        { name: k.kind + " p50", kind: k.kind, colour: colour(k.kind), dashed: true, points: k.points.map((p) => ({ y: p.p50_ms })) },
        { name: k.kind + " p99", kind: k.kind, colour: colour(k.kind), points: k.points.map((p) => ({ y: p.p99_ms })) },
      ]);
      put(charts, 
        lineChart("Jobs done per minute, by kind (last 30 min)", throughput, (v) => Math.round(v)),
        lineChart("Enqueue → done latency, by kind (p50 dashed, p99 solid)", latency, (v) => fmtMs(v)),
      );
      if (!stats.kinds.length) charts.append(h("p", { class: "muted" }, "No job finished in the last 30 minutes."));
    },
  };
};

// ---------------------------------------------------------------- subscriptions

PAGES.subscriptions = (root, id) => {
  const input = h("input", { id: "sub-id", type: "search", placeholder: "subscription id, e.g. order-4711", value: id || "", spellcheck: "false" });
  const form = h("form", { class: "lookup", onsubmit: (e) => {
    e.preventDefault();
    const v = input.value.trim();
    if (v) location.hash = "#/subscriptions/" + encodeURIComponent(v);
  } }, input, h("button", { type: "submit" }, "Look up"));
  const out = h("div", { id: "subscription" });
  append(root, h("h2", {}, "Subscriptions"), form, out);
  const expiry = h("input", { type: "datetime-local", "aria-label": "expires at (UTC)" });

  function controls(sub) {
    if (!isAdmin()) return null;
    const path = "/v1/subscriptions/" + encodeURIComponent(sub);
    return h("div", { class: "controls" },
      h("label", {}, "Expires (UTC, optional) ", expiry),
      action("Provision", "provision", () => run("Provision " + sub, async () => {
        const body = {};
        if (expiry.value) body.expires_at = new Date(expiry.value + "Z").toISOString();
        const r = await api("POST", path + "/provision?wait_ms=0", body);
        return "Provision of " + sub + " accepted: " + r.receipt.jobs_enqueued + " create job(s)";
      })),
      action("Deprovision", "deprovision", () => run("Deprovision " + sub, async () => {
        await api("POST", path + "/deprovision?wait_ms=0");
        return "Deprovision of " + sub + " accepted";
      })),
    );
  }

  return {
    live: !!id,
    async load() {
      if (!id) {
        put(out, h("p", { class: "muted" }, "Look a subscription up by its id."));
        return;
      }
      let v;
      try {
        v = await api("GET", "/v1/subscriptions/" + encodeURIComponent(id));
      } catch (e) {
        if (e.status === 404) {
          put(out, h("p", {}, "No subscription " + id + "."), controls(id));
          return;
        }
        throw e;
      }
      clearLoadError(root);
      const active = v.keys.filter((k) => k.state === "active").length;
      const rows = v.keys.map((k) => h("tr", { "data-server": k.server, class: "key-" + k.state },
        h("td", {}, k.server), h("td", {}, k.kind), h("td", { "data-col": "state" }, k.state),
        h("td", { class: "link" }, k.link ? [h("code", { "data-col": "link", title: k.link }, k.link),
          h("button", { type: "button", class: "copy", "data-copy": "link", onclick: () => copy(k.link) }, "Copy")] : "–"),
        h("td", {}, k.config_synced_at ? h("span", { title: fmtTime(k.config_synced_at) }, ago(k.config_synced_at)) : "–"),
        h("td", {}, fmtBytes(k.traffic_bytes)),
        h("td", { class: "error-text" }, k.last_error || ""),
        h("td", {}, k.server_active ? "" : "server inactive")));
      const keep = document.activeElement === expiry;
      put(out, 
        h("p", { class: "summary" },
          h("span", { class: "stat" }, h("b", {}, v.subscription)),
          h("span", { class: "stat" }, "status ", h("b", {}, v.status)),
          h("span", { class: "stat" }, "expires ", h("b", {}, v.expires_at ? fmtTime(v.expires_at) : "never")),
          h("span", { class: "stat" }, h("b", { id: "links-count" }, v.keys.filter((k) => k.link).length), " links, ", h("b", {}, active), "/", v.keys.length, " keys active"),
          h("span", { class: "stat " + (v.complete ? "good" : "warn") }, v.complete ? "complete" : "not complete")),
        controls(v.subscription),
        h("table", { class: "grid keys" },
          h("thead", {}, h("tr", {}, ["Server", "Kind", "State", "Link", "Config synced", "Traffic", "Last error", ""].map((t) => h("th", {}, t)))),
          h("tbody", {}, rows)));
      if (keep) expiry.focus();
    },
  };
};

// ---------------------------------------------------------------- dead jobs

PAGES.dead = (root) => {
  const server = h("select", { id: "dead-server" }, h("option", { value: "" }, "any server"));
  const kind = h("select", { id: "dead-kind" }, h("option", { value: "" }, "any kind"),
    ["create_key", "delete_key", "sync_config", "reconcile", "collect_traffic"].map((k) => h("option", { value: k }, k)));
  const reason = h("input", { id: "dead-reason", type: "search", placeholder: "reason contains…" });
  const filters = h("form", { class: "filters", onsubmit: (e) => { e.preventDefault(); refresh(); } },
    server, kind, reason, h("button", { type: "submit" }, "Filter"));
  const bulk = h("div", { class: "controls" });
  const body = h("tbody");
  const all = isAdmin() ? h("input", { type: "checkbox", "data-action": "select-all", "aria-label": "select all",
    onchange: () => { for (const c of body.querySelectorAll("input.pick")) c.checked = all.checked; } }) : null;
  append(root, h("h2", {}, "Dead jobs"), filters, bulk,
    h("table", { class: "grid dead" }, h("thead", {}, h("tr", {}, isAdmin() ? h("th", {}, all) : null,
      ["Job", "Server", "Kind", "Attempts", "Reason", "Dead since", ""].map((t) => h("th", {}, t)))), body));
  let jobs = [];

  function selection(ids) { return { ids }; }
  /** Everything the filter matches: by server alone or everything, else the ids listed. */
  function matching() {
    if (!kind.value && !reason.value) {
      return server.value ? { server: server.value } : { all: true };
    }
    return { ids: jobs.map((j) => j.id) };
  }
  const picked = () => [...body.querySelectorAll("input.pick:checked")].map((c) => Number(c.value));
  async function act(verb, sel) {
    const r = await api("POST", "/v1/dead-jobs/" + verb, sel);
    if (verb === "replay") {
      return r.replayed.length + " replayed" + (r.superseded.length ? ", " + r.superseded.length + " superseded by a live job" : "") +
        (r.not_dead.length ? ", " + r.not_dead.length + " no longer dead" : "");
    }
    return r.discarded.length + " discarded";
  }

  function detail(j) {
    return h("tr", { class: "detail", "data-detail": j.id }, h("td", { colspan: isAdmin() ? 8 : 7 },
      h("dl", {},
        h("dt", {}, "Payload"), h("dd", {}, h("pre", {}, JSON.stringify(j.payload, null, 2))),
        h("dt", {}, "Attempts"), h("dd", {}, j.attempts),
        h("dt", {}, "Last error"), h("dd", { class: "error-text" }, j.error),
        h("dt", {}, "Dead since"), h("dd", {}, fmtTime(j.dead_at)))));
  }

  return {
    live: false,
    async load() {
      const [servers] = await Promise.all([server.options.length > 1 ? null : api("GET", "/v1/servers")]);
      if (servers) for (const s of servers) server.append(h("option", { value: s.name }, s.name));
      const q = new URLSearchParams({ limit: "10000" });
      if (server.value) q.set("server", server.value);
      if (kind.value) q.set("kind", kind.value);
      if (reason.value) q.set("reason", reason.value);
      jobs = await api("GET", "/v1/dead-jobs?" + q);
      clearLoadError(root);
      put(body, ...jobs.flatMap((j) => {
        const open = h("button", { type: "button", class: "link-button", "data-open": j.id, onclick: () => {
          const next = tr.nextSibling;
          if (next && next.dataset && next.dataset.detail === String(j.id)) next.remove();
          else tr.after(detail(j));
        } }, "Details");
        const tr = h("tr", { "data-job": j.id },
          isAdmin() ? h("td", {}, h("input", { type: "checkbox", class: "pick", value: j.id, "data-action": "pick", "aria-label": "select job " + j.id })) : null,
          h("td", {}, "#" + j.id), h("td", {}, j.server || "#" + j.server_id), h("td", {}, j.kind),
          h("td", {}, j.attempts), h("td", { class: "error-text" }, j.error), h("td", {}, ago(j.dead_at)),
          h("td", { class: "actions" }, open,
            action("Replay", "replay-one", () => run("Replay #" + j.id, () => act("replay", selection([j.id])))),
            action("Discard", "discard-one", () => run("Discard #" + j.id, () => act("discard", selection([j.id]))))));
        return [tr];
      }));
      if (all) all.checked = false;
      put(bulk, h("span", { class: "muted", id: "dead-count" }, jobs.length + " dead job(s) match"),
        action("Replay selected", "replay-selected", () => run("Replay", () => {
          const ids = picked();
          if (!ids.length) throw new Error("select jobs first");
          return act("replay", selection(ids));
        })),
        action("Discard selected", "discard-selected", () => run("Discard", () => {
          const ids = picked();
          if (!ids.length) throw new Error("select jobs first");
          return act("discard", selection(ids));
        })),
        jobs.length ? action("Replay all " + jobs.length + " matching", "replay-matching", () => run("Replay", () => act("replay", matching()))) : null,
        jobs.length ? action("Discard all " + jobs.length + " matching", "discard-matching", () => run("Discard", () => act("discard", matching()))) : null);
    },
  };
};

// ---------------------------------------------------------------- sweeps

PAGES.sweeps = (root) => {
  const out = h("div");
  const runs = isAdmin() ? h("div", { class: "controls" }, "Run now: ",
    ["reconcile", "expire", "configs", "traffic"].map((s) => action(s, "sweep-" + s, () => run("Sweep " + s, async () => {
      const r = await api("POST", "/v1/sweeps/" + s);
      return "Sweep " + s + ": " + Object.values(r.jobs).reduce((a, b) => a + b, 0) + " job(s) found, " + r.enqueued + " enqueued";
    })))) : null;
  append(root, h("h2", {}, "Sweeps"), h("p", { class: "muted" }, "Scheduled ticks fired by the scheduler, newest first, with what each found and enqueued."), runs, out);
  return {
    live: true,
    async load() {
      const ticks = await api("GET", "/v1/sweeps?per_sweep=10");
      clearLoadError(root);
      const bySweep = new Map();
      for (const t of ticks) {
        if (!bySweep.has(t.sweep)) bySweep.set(t.sweep, []);
        bySweep.get(t.sweep).push(t);
      }
      if (!ticks.length) { put(out, h("p", {}, "No sweep tick has fired yet (is a scheduler running?).")); return; }
      put(out, ...[...bySweep].map(([sweep, list]) => h("section", { class: "card", "data-sweep": sweep },
        h("h3", {}, sweep),
        h("table", { class: "grid" },
          h("thead", {}, h("tr", {}, ["Tick", "Fired", "By", "Found", "Enqueued", "Cancelled", "Took", "Per server"].map((t) => h("th", {}, t)))),
          h("tbody", {}, list.map((t) => h("tr", {},
            h("td", {}, fmtTime(t.tick_at)), h("td", {}, ago(t.fired_at)), h("td", { class: "muted" }, t.fired_by),
            h("td", { "data-col": "found" }, t.found ?? "–"), h("td", { "data-col": "enqueued" }, t.enqueued ?? "–"),
            h("td", {}, t.cancelled ?? "–"), h("td", {}, t.duration_ms === null ? "–" : fmtMs(t.duration_ms)),
            h("td", {}, t.jobs ? Object.entries(t.jobs).filter(([, n]) => n > 0).map(([s, n]) => s + ": " + n).join(", ") || "nothing to do" : "–"))))))));
    },
  };
};

// ---------------------------------------------------------------- start

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const t = document.getElementById("token").value.trim();
    if (t) signIn(t);
  });
  document.getElementById("logout").addEventListener("click", () => signOut("Signed out."));
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) signIn(saved); else signOut("");
});
