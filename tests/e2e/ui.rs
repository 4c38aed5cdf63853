//! The operators' dashboard (`/ui`) in a real headless Chromium, against a live `keyfleet api`,
//! real workers and the fake fleet. Assertions read the page, and check it against the fake
//! servers' meters, Postgres and Redis. Every page's screenshot goes to `target/ui-screenshots/`.

use std::time::Duration;

use keyfleet_core::ServerId;
use keyfleet_fakevpn::{FakeFleet, Fault, Latency};
use serde_json::{Value, json};

use crate::{
    api::{register, token},
    browser::Browser,
    harness::{
        TestEnv,
        chaos::{key_in_state, server_id},
        eventually,
        sweeping::{LoggedProcess, spawn_logged, spawn_scheduler, spawn_worker},
    },
};

const WITHIN: Duration = Duration::from_secs(30);

/// A running `keyfleet api` with an admin and a viewer token.
struct Dashboard {
    _api: LoggedProcess,
    base: String,
    admin: String,
    viewer: String,
    http: reqwest::Client,
}

impl Dashboard {
    fn start(env: &TestEnv) -> Self {
        let mut api = spawn_logged(env, &["api", "--listen", "127.0.0.1:0"], &[]);
        let base = api.await_stdout_line("keyfleet api listening on ", WITHIN);
        Self {
            _api: api,
            base,
            admin: token(env, "ops", "admin"),
            viewer: token(env, "watcher", "viewer"),
            http: reqwest::Client::new(),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.admin);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("the api answers");
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        response.json().await.unwrap()
    }

    /// A purchase by the admin token, answered at once (`wait_ms=0`).
    async fn buy(&self, sub: &str) {
        self.call(
            reqwest::Method::POST,
            &format!("/v1/subscriptions/{sub}/provision?wait_ms=0"),
            Some(json!({})),
        )
        .await;
    }
}

async fn fleet(v2ray: usize, outline: usize) -> FakeFleet {
    crate::api::fleet(v2ray, outline, Latency::Zero).await
}

/// Every key of `sub` in `state` (on `servers` of them).
async fn keys_in_state(env: &TestEnv, sub: &str, servers: &[ServerId], state: &str) {
    for server in servers {
        key_in_state(env, sub, *server, state, WITHIN).await;
    }
}

async fn ids(env: &TestEnv, n: usize) -> Vec<ServerId> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(server_id(env, &format!("s{i}")).await);
    }
    out
}

/// The fleet row of `server`, cell by cell, as the page shows it.
async fn fleet_row(browser: &Browser, server: &str) -> Value {
    browser
        .js(&format!(
            "const tr = document.querySelector('tr[data-server=\"{server}\"]');
             if (!tr) return null;
             const o = {{ class: tr.className }};
             for (const td of tr.querySelectorAll('td[data-col]')) o[td.dataset.col] = td.textContent;
             return o;"
        ))
        .await
}

/// Waits until the fleet page's row of `server` shows `col` = `want`.
async fn until_cell(browser: &Browser, server: &str, col: &str, want: &str) {
    browser
        .until(
            &format!("{server}'s {col} to show {want}"),
            &format!(
                "const td = document.querySelector('tr[data-server=\"{server}\"] td[data-col=\"{col}\"]');
                 return td && td.textContent === {};",
                json!(want)
            ),
        )
        .await;
}

#[tokio::test]
async fn the_fleet_page_shows_every_server_with_its_counts_and_pausing_one_stops_its_claims() {
    let env = TestEnv::new().await;
    let fleet = fleet(2, 1).await;
    register(&env, &fleet, 2);
    let dash = Dashboard::start(&env);
    // One transient failure opens a server's breaker (for the last step), for a minute.
    let _worker = spawn_worker(
        &env,
        8,
        &[
            ("KEYFLEET_BREAKER_THRESHOLD", "1"),
            ("KEYFLEET_BREAKER_COOLDOWN_MS", "60000"),
        ],
    );
    let servers = ids(&env, 3).await;

    // Two purchases; s1 refuses the second one's create for good (401): one dead job on s1.
    dash.buy("ui-a1").await;
    keys_in_state(&env, "ui-a1", &servers, "active").await;
    fleet.servers[1].inject(None, Fault::Status(401), 1);
    dash.buy("ui-a2").await;
    keys_in_state(&env, "ui-a2", &[servers[0], servers[2]], "active").await;
    key_in_state(&env, "ui-a2", servers[1], "failed", WITHIN).await;

    let mut browser = Browser::start("fleet").await;
    browser.sign_in(&dash.base, &dash.admin).await;
    browser.page("#/fleet").await;
    until_cell(&browser, "s2", "keys", "2").await;
    until_cell(&browser, "s1", "dead", "1").await;
    assert_eq!(browser.count("tbody tr[data-server]").await, 3);
    // The page against Redis and Postgres, server by server.
    let stats = env.queue.server_stats().await.unwrap();
    for (i, id) in servers.iter().enumerate() {
        let name = format!("s{i}");
        let row = fleet_row(&browser, &name).await;
        let q = stats.iter().find(|s| s.server == *id).unwrap();
        let keys: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM keys WHERE server_id = $1 AND state = 'active'",
        )
        .bind(id.0)
        .fetch_one(env.store.pool())
        .await
        .unwrap();
        assert_eq!(row["kind"], fleet.servers[i].kind().as_str(), "{row}");
        assert_eq!(row["active"], "yes", "{row}");
        assert_eq!(row["limit"], "2", "{row}");
        assert_eq!(row["ready"], q.ready.to_string(), "{row}");
        assert_eq!(row["delayed"], q.delayed.to_string(), "{row}");
        assert_eq!(row["dead"], q.dead.to_string(), "{row}");
        assert_eq!(row["in_flight"], "0", "{row}");
        assert_eq!(row["breaker"], "closed", "{row}");
        assert_eq!(row["keys"], keys.to_string(), "{row}");
    }
    assert_eq!(fleet_row(&browser, "s0").await["keys"], "2");
    assert_eq!(fleet_row(&browser, "s1").await["keys"], "1");
    // The server with a dead job stands out; the others do not.
    let s1 = fleet_row(&browser, "s1").await;
    assert!(
        s1["class"].as_str().unwrap().contains("health-warn"),
        "{s1}"
    );
    assert!(
        s1["health"].as_str().unwrap().contains("1 dead job"),
        "{s1}"
    );
    let s0 = fleet_row(&browser, "s0").await;
    assert!(s0["class"].as_str().unwrap().contains("health-ok"), "{s0}");
    // The workers' rollups reached the page: s0 answered requests, none failed.
    browser
        .until(
            "s0's latency from the rollups",
            "const td = document.querySelector('tr[data-server=\"s0\"] td[data-col=\"p50\"]'); return td && td.textContent.endsWith('ms');",
        )
        .await;
    browser.screenshot("fleet").await;
    browser.assert_clean_console("the fleet page").await;

    // Pause s0 from the page: Postgres and Redis hold it, and s0 gets no request from now on.
    browser
        .click("tr[data-server=\"s0\"] [data-action=\"pause\"]")
        .await;
    eventually(WITHIN, "s0 paused in Redis", || async {
        let stats = env.queue.server_stats().await.ok()?;
        stats
            .iter()
            .find(|s| s.server == servers[0])
            .is_some_and(|s| s.paused && s.running == 0)
            .then_some(())
    })
    .await;
    assert!(env.store.server_by_name("s0").await.unwrap().paused);
    browser
        .until(
            "s0's row to show it paused",
            "const tr = document.querySelector('tr[data-server=\"s0\"]'); return tr.classList.contains('paused') && !tr.querySelector('[data-action=\"resume\"]').hidden;",
        )
        .await;
    let before = fleet.servers[0].meter().total_requests;
    fleet.servers[1].clear_faults();
    dash.buy("ui-a3").await;
    // The other servers served the purchase; s0 saw nothing and its key waits.
    keys_in_state(&env, "ui-a3", &servers[1..], "active").await;
    until_cell(&browser, "s0", "ready", "1").await;
    assert_eq!(
        fleet.servers[0].meter().total_requests,
        before,
        "a paused server got requests"
    );
    key_in_state(&env, "ui-a3", servers[0], "pending", WITHIN).await;
    browser.screenshot("fleet-paused").await;

    // Resume from the page: the waiting key is created.
    browser
        .click("tr[data-server=\"s0\"] [data-action=\"resume\"]")
        .await;
    key_in_state(&env, "ui-a3", servers[0], "active", WITHIN).await;
    until_cell(&browser, "s0", "keys", "3").await;
    browser.assert_clean_console("pausing and resuming").await;

    // The other actions, each checked where it lands.
    browser
        .type_into("tr[data-server=\"s2\"] input.limit", "3")
        .await;
    browser
        .click("tr[data-server=\"s2\"] [data-action=\"set-limit\"]")
        .await;
    until_cell(&browser, "s2", "limit", "3").await;
    assert_eq!(
        env.store.server_by_name("s2").await.unwrap().max_in_flight,
        3
    );
    let limit = env.queue.server_stats().await.unwrap();
    assert_eq!(
        limit.iter().find(|s| s.server == servers[2]).unwrap().limit,
        Some(3)
    );
    let generation = env
        .store
        .server_by_name("s0")
        .await
        .unwrap()
        .config_generation;
    browser
        .click("tr[data-server=\"s0\"] [data-action=\"bump-config\"]")
        .await;
    eventually(WITHIN, "s0's config generation to move", || async {
        let now = env.store.server_by_name("s0").await.ok()?.config_generation;
        (now > generation).then_some(())
    })
    .await;
    let listed = fleet.servers[2].meter().total_requests;
    browser
        .click("tr[data-server=\"s2\"] [data-action=\"reconcile\"]")
        .await;
    eventually(WITHIN, "a reconcile of s2 to list it", || async {
        (fleet.servers[2].meter().total_requests > listed).then_some(())
    })
    .await;
    // Deactivate asks twice.
    browser
        .click("tr[data-server=\"s1\"] [data-action=\"deactivate\"]")
        .await;
    assert!(env.store.server_by_name("s1").await.unwrap().active);
    browser
        .click("tr[data-server=\"s1\"] [data-action=\"deactivate\"]")
        .await;
    until_cell(&browser, "s1", "active", "no").await;
    assert!(!env.store.server_by_name("s1").await.unwrap().active);
    browser.screenshot("fleet-actions").await;
    browser.assert_clean_console("the fleet's actions").await;

    // A server that stops answering stands out: red, and the page says why.
    fleet.servers[2].set_refusing(true);
    dash.buy("ui-a4").await;
    until_cell(&browser, "s2", "breaker", "open").await;
    let s2 = fleet_row(&browser, "s2").await;
    assert!(
        s2["class"].as_str().unwrap().contains("health-trouble"),
        "{s2}"
    );
    assert!(
        s2["health"]
            .as_str()
            .unwrap()
            .contains("circuit breaker open"),
        "{s2}"
    );
    assert_eq!(
        browser.count("tr.health-trouble").await,
        1,
        "only s2 is in trouble"
    );
    browser.screenshot("fleet-trouble").await;
    browser.assert_clean_console("a server in trouble").await;
    browser.close().await;
    env.cleanup().await;
}

#[tokio::test]
async fn replaying_a_dead_job_from_the_page_runs_it_and_the_subscription_shows_all_11_links() {
    let env = TestEnv::new().await;
    let fleet = fleet(10, 1).await;
    register(&env, &fleet, 4);
    let dash = Dashboard::start(&env);
    let _worker = spawn_worker(&env, 16, &[]);
    let servers = ids(&env, 11).await;

    // s3 refuses the purchase's create for good: its job is dead, the ten others are live.
    fleet.servers[3].inject(None, Fault::Status(401), 1);
    dash.buy("ui-order-1").await;
    let others: Vec<ServerId> = servers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3)
        .map(|(_, s)| *s)
        .collect();
    keys_in_state(&env, "ui-order-1", &others, "active").await;
    key_in_state(&env, "ui-order-1", servers[3], "failed", WITHIN).await;

    let mut browser = Browser::start("replay").await;
    browser.sign_in(&dash.base, &dash.admin).await;
    browser.page("#/subscriptions/ui-order-1").await;
    browser
        .until(
            "ten links",
            "const n = document.getElementById('links-count'); return n && n.textContent === '10';",
        )
        .await;
    browser.screenshot("subscription-failed-key").await;

    // The dead-jobs page, filtered by server and kind, shows the one dead create; replay it.
    browser.page("#/dead").await;
    browser
        .until(
            "the server filter to list s3",
            "return !!document.querySelector('#dead-server option[value=\"s3\"]')",
        )
        .await;
    browser
        .js("document.getElementById('dead-server').value = 's3';
             document.getElementById('dead-kind').value = 'create_key';
             document.getElementById('dead-reason').value = '401';
             return true")
        .await;
    browser.click(".filters button[type=submit]").await;
    browser
        .until(
            "one dead job for s3",
            "const c = document.getElementById('dead-count'); return c && c.textContent.startsWith('1 ')",
        )
        .await;
    let job = browser
        .js("return document.querySelector('tr[data-job]').dataset.job")
        .await;
    browser.click("[data-open]").await;
    let detail = browser
        .until(
            "the job's detail",
            "const d = document.querySelector('tr.detail'); return d && d.textContent",
        )
        .await;
    assert!(
        detail.as_str().unwrap().contains("ui-order-1"),
        "the payload names the subscription: {detail}"
    );
    browser.screenshot("dead-jobs").await;
    browser
        .click(&format!(
            "tr[data-job=\"{}\"] [data-action=\"replay-one\"]",
            job.as_str().unwrap()
        ))
        .await;

    // It runs: the key is created on s3, and the page shows all eleven links, the servers' own.
    key_in_state(&env, "ui-order-1", servers[3], "active", WITHIN).await;
    assert_eq!(env.queue.stats().await.unwrap().dead, 0);
    browser
        .until(
            "no dead job left",
            "const c = document.getElementById('dead-count'); return c && c.textContent.startsWith('0 ')",
        )
        .await;
    browser.page("#/subscriptions/ui-order-1").await;
    browser
        .until(
            "eleven links",
            "const n = document.getElementById('links-count'); return n && n.textContent === '11';",
        )
        .await;
    let shown = browser
        .js("return [...document.querySelectorAll('tr[data-server]')].map(tr => [tr.dataset.server, tr.querySelector('code[data-col=link]')?.textContent || null])")
        .await;
    let shown = shown.as_array().unwrap();
    assert_eq!(shown.len(), 11);
    for (i, fake) in fleet.servers.iter().enumerate() {
        let users = fake.users();
        assert_eq!(users.len(), 1, "one key on s{i}");
        let row = shown
            .iter()
            .find(|r| r[0] == format!("s{i}"))
            .unwrap_or_else(|| panic!("s{i} is listed"));
        assert_eq!(row[1], users[0].link, "s{i}'s link is the server's");
    }
    assert_eq!(browser.count("button[data-copy]").await, 11);
    browser
        .click("tr[data-server=\"s0\"] button[data-copy]")
        .await;
    browser
        .until(
            "the copy button to answer",
            "return document.getElementById('toast').textContent === 'Copied'",
        )
        .await;
    browser.screenshot("subscription").await;

    // Deprovision from the page: every server's key is deleted; provision again: all back.
    browser.click("[data-action=\"deprovision\"]").await;
    keys_in_state(&env, "ui-order-1", &servers, "deleted").await;
    assert!(fleet.servers.iter().all(|f| f.users().is_empty()));
    browser
        .until(
            "no link left",
            "const n = document.getElementById('links-count'); return n && n.textContent === '0';",
        )
        .await;
    browser.click("[data-action=\"provision\"]").await;
    keys_in_state(&env, "ui-order-1", &servers, "active").await;
    assert!(fleet.servers.iter().all(|f| f.users().len() == 1));

    // Bulk actions: three more dead creates; replay a selection, discard all matching a filter,
    // then replay all that is left.
    for i in [5, 6] {
        fleet.servers[i].inject(None, Fault::Status(401), 1);
    }
    dash.buy("ui-order-2").await;
    key_in_state(&env, "ui-order-2", servers[5], "failed", WITHIN).await;
    key_in_state(&env, "ui-order-2", servers[6], "failed", WITHIN).await;
    fleet.servers[7].inject(None, Fault::Status(401), 1);
    dash.buy("ui-order-3").await;
    key_in_state(&env, "ui-order-3", servers[7], "failed", WITHIN).await;
    let s7_creates = fleet.servers[7].meter().creates_committed;
    browser.page("#/dead").await;
    let dead_count = |n: usize| {
        format!(
            "const c = document.getElementById('dead-count'); return c && c.textContent.startsWith('{n} ')"
        )
    };
    browser.until("three dead jobs", &dead_count(3)).await;
    let on_s5 = browser
        .js("return [...document.querySelectorAll('tr[data-job]')].find(tr => tr.children[2].textContent === 's5').dataset.job")
        .await;
    browser
        .click(&format!(
            "tr[data-job=\"{}\"] input.pick",
            on_s5.as_str().unwrap()
        ))
        .await;
    browser.click("[data-action=\"replay-selected\"]").await;
    key_in_state(&env, "ui-order-2", servers[5], "active", WITHIN).await;
    browser.until("two dead jobs", &dead_count(2)).await;
    browser
        .js("document.getElementById('dead-server').value = 's7'; return true")
        .await;
    browser.click(".filters button[type=submit]").await;
    browser.until("one dead job on s7", &dead_count(1)).await;
    browser.click("[data-action=\"discard-matching\"]").await;
    browser.until("none left on s7", &dead_count(0)).await;
    assert_eq!(
        env.queue.stats().await.unwrap().dead,
        1,
        "only s6's is left"
    );
    key_in_state(&env, "ui-order-3", servers[7], "failed", WITHIN).await;
    browser
        .js("document.getElementById('dead-server').value = ''; return true")
        .await;
    browser.click(".filters button[type=submit]").await;
    browser.until("s6's dead job", &dead_count(1)).await;
    browser.click("[data-action=\"replay-matching\"]").await;
    key_in_state(&env, "ui-order-2", servers[6], "active", WITHIN).await;
    assert_eq!(env.queue.stats().await.unwrap().dead, 0);
    assert_eq!(
        fleet.servers[7].meter().creates_committed,
        s7_creates,
        "the discarded create never ran again"
    );

    // The queue page charts the creates the workers did (their rollups, through Redis).
    browser.page("#/queue").await;
    browser
        .until(
            "a throughput line for create_key",
            "return !!document.querySelector('path[data-series=\"create_key\"]')",
        )
        .await;
    browser.screenshot("queue").await;
    browser
        .assert_clean_console("the subscription, dead-jobs and queue pages")
        .await;
    browser.close().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_viewer_sees_every_page_and_no_action_and_no_secret_reaches_the_page() {
    let env = TestEnv::new().await;
    let fleet = fleet(1, 1).await;
    register(&env, &fleet, 2);
    let dash = Dashboard::start(&env);
    let _worker = spawn_worker(&env, 4, &[]);
    let servers = ids(&env, 2).await;
    fleet.servers[0].inject(None, Fault::Status(401), 1);
    dash.buy("ui-v1").await;
    key_in_state(&env, "ui-v1", servers[1], "active", WITHIN).await;
    key_in_state(&env, "ui-v1", servers[0], "failed", WITHIN).await;
    // Reconcile every second: the Sweeps page gets ticks with findings.
    let _scheduler = spawn_scheduler(&env, &[("reconcile", "* * * * * *")]);

    let mut browser = Browser::start("viewer").await;
    browser.sign_in(&dash.base, &dash.viewer).await;
    let who = browser
        .js("return document.getElementById('who').textContent")
        .await;
    assert_eq!(who, "watcher (viewer)");
    let pages = [
        ("#/fleet", "tr[data-server=\"s1\"] td[data-col=\"keys\"]"),
        ("#/queue", ".count[data-state=\"dead\"]"),
        ("#/subscriptions/ui-v1", "#links-count"),
        ("#/dead", "tr[data-job]"),
        (
            "#/sweeps",
            "section[data-sweep=\"reconcile\"] td[data-col=\"found\"]",
        ),
    ];
    let api_key = fleet.servers[0].api_key().expect("a v2ray API key");
    let outline_url = fleet.servers[1].api_url();
    let outline_prefix = url::Url::parse(&outline_url).unwrap().path().to_owned();
    assert!(
        outline_prefix.len() > 8,
        "the Outline URL has a secret path"
    );
    for (hash, ready) in pages {
        browser.page(hash).await;
        browser
            .until(
                &format!("{hash} to show {ready}"),
                &format!("return !!document.querySelector({})", json!(ready)),
            )
            .await;
        let name = hash.trim_start_matches("#/").split('/').next().unwrap();
        browser.screenshot(name).await;
        assert_eq!(
            browser.count("[data-action]").await,
            0,
            "{hash} shows a viewer action controls"
        );
        let buttons = browser
            .js("return [...document.querySelectorAll('#app button')].map(b => b.textContent).filter(t => !['Copy', 'Details', 'Look up', 'Filter'].includes(t))")
            .await;
        assert_eq!(
            buttons,
            json!([]),
            "{hash}: buttons a viewer should not have"
        );
        let text = browser.js("return document.body.innerText").await;
        for junk in ["null", "undefined", "NaN", "[object"] {
            assert!(
                !text.as_str().unwrap().contains(junk),
                "{hash} shows {junk:?}:\n{text}"
            );
        }
        let html = browser
            .js("return document.documentElement.outerHTML")
            .await;
        let html = html.as_str().unwrap();
        assert!(!html.contains(&api_key), "{hash} shows an API key");
        assert!(
            !html.contains(&outline_prefix),
            "{hash} shows an Outline prefix"
        );
        assert!(!html.contains(&dash.viewer), "{hash} shows the token");
        browser.assert_clean_console(hash).await;
    }
    // The sweep ticks say what they found: one key to repair on s0 at most, per tick.
    let found = browser
        .js("return document.querySelector('section[data-sweep=\"reconcile\"] td[data-col=\"found\"]').textContent")
        .await;
    assert!(found.as_str().unwrap().parse::<u64>().is_ok(), "{found}");
    // The token lasts for the tab (sessionStorage), survives a reload, and signing out forgets it.
    browser.client().refresh().await.unwrap();
    browser
        .until(
            "still signed in after a reload",
            "return !document.getElementById('top').hidden && document.getElementById('who').textContent === 'watcher (viewer)'",
        )
        .await;
    let kept = browser
        .js("return sessionStorage.getItem('keyfleet.token')")
        .await;
    assert_eq!(kept, json!(dash.viewer));
    assert_eq!(
        browser
            .js("return localStorage.length + document.cookie.length")
            .await,
        json!(0),
        "nothing outlives the tab"
    );
    browser.click("#logout").await;
    browser
        .until(
            "the sign-in form",
            "return !document.getElementById('login').hidden",
        )
        .await;
    assert_eq!(
        browser
            .js("return sessionStorage.getItem('keyfleet.token')")
            .await,
        Value::Null
    );
    browser.client().refresh().await.unwrap();
    browser
        .until(
            "the sign-in form after a reload",
            "return !document.getElementById('login').hidden && document.getElementById('top').hidden",
        )
        .await;
    browser
        .assert_clean_console("reloading and signing out")
        .await;

    // Nor does anything the page reads hold one.
    for path in [
        "/v1/me",
        "/v1/fleet",
        "/v1/servers",
        "/v1/queue",
        "/v1/stats/jobs",
        "/v1/sweeps",
        "/v1/dead-jobs",
        "/v1/subscriptions/ui-v1",
    ] {
        let response = dash
            .http
            .get(format!("{}{path}", dash.base))
            .bearer_auth(&dash.viewer)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        let body = response.text().await.unwrap();
        assert!(!body.contains(&api_key), "{path} holds an API key: {body}");
        assert!(
            !body.contains(&outline_prefix),
            "{path} holds an Outline prefix: {body}"
        );
        assert!(!body.contains(&dash.viewer), "{path} holds the token");
    }
    // And the API refuses what the page hides.
    let refused = dash
        .http
        .post(format!("{}/v1/servers/s0/pause", dash.base))
        .bearer_auth(&dash.viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), reqwest::StatusCode::FORBIDDEN);
    browser.close().await;
    env.cleanup().await;
}

#[tokio::test]
async fn demo_serve_leaves_the_dashboard_up_on_the_demos_data() {
    let env = TestEnv::new().await;
    let database = format!("kf_test_demo_{}", uuid::Uuid::new_v4().simple());
    let mut demo = spawn_logged(
        &env,
        &[
            "demo",
            "--subscriptions",
            "3",
            "--workers",
            "1",
            "--concurrency",
            "16",
            "--database",
            &database,
            "--serve",
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let url = demo.await_stdout_line("Dashboard: ", Duration::from_secs(120));
    let url = url.split_whitespace().next().unwrap().to_owned();
    let token = format!("kf_{}", demo.await_stdout_line("kf_", WITHIN));
    let base = url.trim_end_matches("/ui").to_owned();
    let fleet: Value = reqwest::Client::new()
        .get(format!("{base}/v1/fleet"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let servers = fleet["servers"].as_array().unwrap();
    // The demo's fleet: 10 V2Ray panels, 1 Outline server and 1 Xray gRPC node.
    assert_eq!(servers.len(), 12, "{fleet}");
    assert!(servers.iter().all(|s| s["keys"] == 3), "{fleet}");

    let mut browser = Browser::start("demo").await;
    browser.sign_in(&base, &token).await;
    browser.page("#/fleet").await;
    browser
        .until(
            "the demo's twelve servers",
            "return document.querySelectorAll('tbody tr[data-server]').length === 12",
        )
        .await;
    browser.screenshot("fleet").await;
    browser.assert_clean_console("the demo's fleet page").await;
    browser.close().await;
    assert!(demo.terminate(WITHIN).success(), "{}", demo.log());
    env.store
        .execute_admin(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        .await
        .unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn the_dashboards_figures_add_up_over_two_worker_processes() {
    let env = TestEnv::new().await;
    let fleet = fleet(2, 1).await;
    register(&env, &fleet, 2);
    let dash = Dashboard::start(&env);
    let _a = spawn_worker(&env, 4, &[]);
    let _b = spawn_worker(&env, 4, &[]);
    let servers = ids(&env, 3).await;
    for i in 0..12 {
        dash.buy(&format!("ui-sum-{i}")).await;
    }
    for i in 0..12 {
        keys_in_state(&env, &format!("ui-sum-{i}"), &servers, "active").await;
    }
    // Every create counted once, whichever worker ran it; every request the fakes saw, per server.
    let stats = eventually(WITHIN, "36 creates in the rollups", || async {
        let stats = dash
            .call(reqwest::Method::GET, "/v1/stats/jobs?minutes=5", None)
            .await;
        let done: i64 = stats["kinds"]
            .as_array()?
            .iter()
            .filter(|k| k["kind"] == "create_key")
            .flat_map(|k| k["points"].as_array().unwrap().iter())
            .map(|p| p["done"].as_i64().unwrap())
            .sum();
        (done == 36).then_some(stats)
    })
    .await;
    assert_eq!(stats["kinds"].as_array().unwrap().len(), 1, "{stats}");
    let view = eventually(WITHIN, "every request in the fleet's figures", || async {
        let view = dash.call(reqwest::Method::GET, "/v1/fleet", None).await;
        let all = fleet.servers.iter().enumerate().all(|(i, fake)| {
            view["servers"][i]["requests"].as_u64() == Some(fake.meter().total_requests)
        });
        all.then_some(view)
    })
    .await;
    for row in view["servers"].as_array().unwrap() {
        assert_eq!(row["errors"], 0, "{row}");
        assert_eq!(row["health"], "ok", "{row}");
        assert_eq!(row["keys"], 12, "{row}");
        assert!(row["p50_ms"].as_f64().unwrap() <= row["p99_ms"].as_f64().unwrap());
    }
    // Out-of-range windows are refused, naming the parameter.
    for (path, field) in [
        ("/v1/stats/jobs?minutes=0", "minutes"),
        ("/v1/stats/jobs?minutes=181", "minutes"),
        ("/v1/stats/jobs?minutes=soon", "minutes"),
        ("/v1/sweeps?per_sweep=101", "per_sweep"),
    ] {
        let response = dash
            .http
            .get(format!("{}{path}", dash.base))
            .bearer_auth(&dash.admin)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            reqwest::StatusCode::UNPROCESSABLE_ENTITY,
            "{path}"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["field"], field, "{path}: {body}");
    }
    env.cleanup().await;
}
