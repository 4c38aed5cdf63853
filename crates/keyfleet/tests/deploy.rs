//! `deploy/` agrees with itself and with the binary: the ports that probes, Services, healthchecks
//! and the ScaledObject name exist on the containers and are the ones the `--listen` flags open;
//! probes ask `/healthz` (liveness) and `/readyz` (readiness); every variable set is one keyfleet
//! reads (`settings::ENV_VARS`) and secrets arrive as files; grace periods cover the shutdown
//! grace; the autoscaler scales the workers on `keyfleet_claimable_jobs` one `--concurrency` per
//! pod; the kustomization lists every manifest. Each test reports every problem it finds at once.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use keyfleet::settings::{DEFAULT_SHUTDOWN_GRACE, ENV_VARS};
use serde::Deserialize;
use serde_yaml_ng::Value;

/// What a process needs after its shutdown grace: releasing claims, the last write-back, exiting.
const STOP_MARGIN_SECS: u64 = 5;
/// The metric KEDA scales the workers on.
const SCALING_METRIC: &str = "keyfleet_claimable_jobs";
/// The roles that run until stopped and serve /healthz and /readyz.
const LONG_RUNNING: [&str; 3] = ["api", "worker", "scheduler"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .canonicalize()
        .unwrap()
}

/// Every YAML document of a file, with merge keys (`<<: *anchor`) applied.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            let mut value = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
            value.apply_merge().unwrap();
            value
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check(&mut self, ok: bool, problem: impl FnOnce() -> String) {
        if !ok {
            self.0.push(problem());
        }
    }

    fn assert_none(self, what: &str) {
        assert!(
            self.0.is_empty(),
            "{what}: {} problems:\n  {}",
            self.0.len(),
            self.0.join("\n  ")
        );
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|items| items.iter().filter_map(text).collect())
        .unwrap_or_default()
}

fn string_map(value: &Value) -> BTreeMap<String, String> {
    value
        .as_mapping()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((text(k)?, text(v).unwrap_or_default())))
                .collect()
        })
        .unwrap_or_default()
}

/// The value of `--name V` or `--name=V`.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, arg)| {
        if arg == name {
            args.get(i + 1).map(String::as_str)
        } else {
            arg.strip_prefix(name)?.strip_prefix('=')
        }
    })
}

/// The port a role's HTTP server listens on, from `--listen` (api) or `--metrics-listen`.
fn listen_port(args: &[String]) -> Option<u16> {
    let addr = flag(args, "--listen").or_else(|| flag(args, "--metrics-listen"))?;
    addr.rsplit_once(':')?.1.parse().ok()
}

fn url_has_password(value: &str) -> bool {
    value.split_whitespace().any(|word| {
        url::Url::parse(word).is_ok_and(|u| u.password().is_some_and(|p| !p.is_empty()))
    })
}

/// A command-line argument that carries a secret: a database URL (they hold the password), a
/// Redis URL with a password, or a server's API key or Outline URL.
fn secret_looking_arg(arg: &str) -> bool {
    let lower = arg.to_ascii_lowercase();
    lower.contains("postgres://")
        || lower.contains("postgresql://")
        || (lower.contains("redis") && url_has_password(arg))
        || ["--api-key", "--api-url"]
            .iter()
            .any(|f| arg == *f || arg.starts_with(&format!("{f}=")))
}

fn shutdown_grace_secs(env: &BTreeMap<String, String>) -> u64 {
    let configured = env.get("KEYFLEET_SHUTDOWN_GRACE_MS").map(|ms| {
        ms.parse::<u64>()
            .expect("KEYFLEET_SHUTDOWN_GRACE_MS is a number")
    });
    let ms = configured
        .unwrap_or(0)
        .max(DEFAULT_SHUTDOWN_GRACE.as_millis() as u64);
    ms.div_ceil(1000)
}

/// The Dockerfile's runtime stage: its user, entrypoint, and the packages it installs.
struct Image {
    user: Option<String>,
    entrypoint: Option<String>,
    packages: BTreeSet<String>,
}

fn image() -> Image {
    let text = std::fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    let runtime = text.rsplit("\nFROM ").next().unwrap().replace("\\\n", " ");
    let last = |instruction: &str| {
        runtime
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix(instruction))
            .map(|rest| rest.trim().to_owned())
    };
    let packages = runtime
        .split("apt-get install")
        .skip(1)
        .flat_map(|rest| {
            rest.split("&&")
                .next()
                .unwrap()
                .split_whitespace()
                .filter(|w| !w.starts_with('-'))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    Image {
        user: last("USER "),
        entrypoint: last("ENTRYPOINT "),
        packages,
    }
}

// --- Kubernetes ---------------------------------------------------------------------------------

struct Manifest {
    file: String,
    doc: Value,
}

impl Manifest {
    fn kind(&self) -> &str {
        self.doc["kind"].as_str().unwrap_or("")
    }

    fn name(&self) -> &str {
        self.doc["metadata"]["name"].as_str().unwrap_or("")
    }

    fn at(&self) -> String {
        format!("{}: {} {}", self.file, self.kind(), self.name())
    }
}

fn k8s_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(deploy_dir().join("k8s"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|f| f.ends_with(".yaml") || f.ends_with(".yml"))
        .collect();
    files.sort();
    files
}

fn k8s() -> Vec<Manifest> {
    let dir = deploy_dir().join("k8s");
    k8s_files()
        .into_iter()
        .flat_map(|file| {
            documents(&dir.join(&file))
                .into_iter()
                .map(move |doc| Manifest {
                    file: format!("k8s/{file}"),
                    doc,
                })
        })
        .collect()
}

/// A Deployment or Job: its pod template.
struct Workload<'a> {
    manifest: &'a Manifest,
    template: &'a Value,
}

impl Workload<'_> {
    fn pod(&self) -> &Value {
        &self.template["spec"]
    }

    fn labels(&self) -> BTreeMap<String, String> {
        string_map(&self.template["metadata"]["labels"])
    }

    fn containers(&self) -> impl Iterator<Item = &Value> {
        self.pod()["containers"].as_sequence().into_iter().flatten()
    }

    /// The keyfleet role its (first) container runs: `worker`, `api`, ...
    fn role(&self) -> String {
        self.containers()
            .next()
            .and_then(|c| strings(&c["args"]).into_iter().next())
            .unwrap_or_default()
    }

    fn selected_by(&self, selector: &BTreeMap<String, String>) -> bool {
        let labels = self.labels();
        !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

fn workloads(manifests: &[Manifest]) -> Vec<Workload<'_>> {
    manifests
        .iter()
        .filter_map(|m| match m.kind() {
            "Deployment" | "StatefulSet" | "DaemonSet" | "Job" => Some(Workload {
                manifest: m,
                template: &m.doc["spec"]["template"],
            }),
            _ => None,
        })
        .collect()
}

/// The container port a probe or Service names, by name or number.
fn resolve_port(container: &Value, port: &Value) -> Option<u64> {
    let ports = container["ports"].as_sequence()?;
    match port {
        Value::String(name) => ports
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_u64()),
        Value::Number(n) => ports
            .iter()
            .filter_map(|p| p["containerPort"].as_u64())
            .find(|p| Some(*p) == n.as_u64()),
        _ => None,
    }
}

/// The environment a container gets: its ConfigMaps' data (envFrom), then its `env` entries
/// (value, or "" when it comes from elsewhere).
fn k8s_env(
    container: &Value,
    config_maps: &BTreeMap<String, BTreeMap<String, String>>,
    at: &str,
    problems: &mut Problems,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for source in container["envFrom"].as_sequence().into_iter().flatten() {
        if let Some(name) = source["configMapRef"]["name"].as_str() {
            match config_maps.get(name) {
                Some(data) => env.extend(data.clone()),
                None => problems.0.push(format!(
                    "{at}: envFrom names ConfigMap {name}, which no manifest defines"
                )),
            }
        }
        problems.check(source["secretRef"].is_null(), || {
            format!(
                "{at}: envFrom secretRef puts secrets in the environment; mount them and use *_FILE"
            )
        });
    }
    for var in container["env"].as_sequence().into_iter().flatten() {
        let name = var["name"].as_str().unwrap_or_default().to_owned();
        let value = match &var["valueFrom"]["configMapKeyRef"] {
            Value::Null => text(&var["value"]).unwrap_or_default(),
            r => config_maps
                .get(r["name"].as_str().unwrap_or_default())
                .and_then(|d| d.get(r["key"].as_str().unwrap_or_default()))
                .cloned()
                .unwrap_or_default(),
        };
        env.insert(name, value);
    }
    env
}

/// Variables keyfleet reads, values without passwords, and every *_FILE inside a mounted secret.
fn check_env(
    env: &BTreeMap<String, String>,
    secret_dirs: &[String],
    at: &str,
    problems: &mut Problems,
) {
    for (name, value) in env {
        problems.check(ENV_VARS.contains(&name.as_str()), || {
            format!("{at}: sets {name}, which keyfleet does not read (settings::ENV_VARS)")
        });
        problems.check(!url_has_password(value), || {
            format!("{at}: {name} holds a URL with a password; put it in a secret file")
        });
        if name.ends_with("_FILE") {
            problems.check(
                secret_dirs
                    .iter()
                    .any(|dir| value.starts_with(&format!("{}/", dir.trim_end_matches('/')))),
                || format!("{at}: {name}={value} is not inside a mounted secret ({secret_dirs:?})"),
            );
        }
    }
}

/// Runs as the image's unprivileged user, read-only, with no capabilities, within its resources.
fn check_hardening(
    container: &Value,
    pod: &Value,
    image: &Image,
    at: &str,
    problems: &mut Problems,
) {
    let security = &container["securityContext"];
    let pod_security = &pod["securityContext"];
    let effective = |key: &str| match &security[key] {
        Value::Null => pod_security[key].clone(),
        v => v.clone(),
    };
    problems.check(effective("runAsNonRoot") == Value::Bool(true), || {
        format!("{at}: runAsNonRoot is not true")
    });
    problems.check(
        text(&effective("runAsUser")).is_some() && text(&effective("runAsUser")) == image.user,
        || format!("{at}: runAsUser is not the image's USER {:?}", image.user),
    );
    for (key, want) in [
        ("readOnlyRootFilesystem", true),
        ("allowPrivilegeEscalation", false),
    ] {
        problems.check(security[key] == Value::Bool(want), || {
            format!("{at}: securityContext.{key} is not {want}")
        });
    }
    problems.check(
        strings(&security["capabilities"]["drop"]).contains(&"ALL".into()),
        || format!("{at}: securityContext.capabilities.drop lacks ALL"),
    );
    for (kind, resource) in [
        ("requests", "cpu"),
        ("requests", "memory"),
        ("limits", "cpu"),
        ("limits", "memory"),
    ] {
        problems.check(!container["resources"][kind][resource].is_null(), || {
            format!("{at}: no resources.{kind}.{resource}")
        });
    }
}

/// Listens where its ports, probes and scrape annotation say, and may finish its grace.
fn check_serving(
    w: &Workload,
    container: &Value,
    args: &[String],
    env: &BTreeMap<String, String>,
    at: &str,
    problems: &mut Problems,
) {
    let pod = w.pod();
    let listen = listen_port(args);
    problems.check(listen.is_some(), || {
        format!("{at}: no --listen / --metrics-listen in {args:?}")
    });
    let container_ports: Vec<u64> = container["ports"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|p| p["containerPort"].as_u64())
        .collect();
    if let Some(listen) = listen {
        problems.check(container_ports.contains(&u64::from(listen)), || {
            format!("{at}: listens on {listen}, but its containerPorts are {container_ports:?}")
        });
    }
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ] {
        let get = &container[probe]["httpGet"];
        if probe == "startupProbe" && container[probe].is_null() {
            continue;
        }
        problems.check(get["path"].as_str() == Some(path), || {
            format!("{at}: {probe} asks {:?}, want {path}", get["path"])
        });
        let port = resolve_port(container, &get["port"]);
        problems.check(port.is_some() && port == listen.map(u64::from), || {
            format!(
                "{at}: {probe} port {:?} is not the container's listen port {listen:?}",
                get["port"]
            )
        });
    }
    let annotations = string_map(&w.template["metadata"]["annotations"]);
    if let Some(port) = annotations.get("prometheus.io/port") {
        problems.check(port.parse().ok() == listen, || {
            format!("{at}: prometheus.io/port {port} is not its listen port {listen:?}")
        });
    }
    let grace = shutdown_grace_secs(env);
    let period = pod["terminationGracePeriodSeconds"].as_u64();
    problems.check(period.is_some_and(|p| p >= grace + STOP_MARGIN_SECS), || {
        format!("{at}: terminationGracePeriodSeconds {period:?}, want at least the shutdown grace {grace} s + {STOP_MARGIN_SECS} s")
    });
}

/// The Kubernetes manifests, and what several checks look up in them.
struct K8s {
    manifests: Vec<Manifest>,
}

impl K8s {
    fn load() -> Self {
        Self { manifests: k8s() }
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Manifest> {
        self.manifests.iter().filter(move |m| m.kind() == kind)
    }

    fn config_maps(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        self.of_kind("ConfigMap")
            .map(|m| (m.name().to_owned(), string_map(&m.doc["data"])))
            .collect()
    }

    fn scaled_targets(&self) -> BTreeSet<&str> {
        self.of_kind("ScaledObject")
            .filter_map(|m| m.doc["spec"]["scaleTargetRef"]["name"].as_str())
            .collect()
    }
}

#[test]
fn k8s_runs_each_role_once_with_matching_selectors_and_replicas() {
    let k8s = K8s::load();
    let workloads = workloads(&k8s.manifests);
    let scaled_targets = k8s.scaled_targets();
    let mut problems = Problems::default();
    for role in LONG_RUNNING {
        let n = workloads
            .iter()
            .filter(|w| w.manifest.kind() == "Deployment" && w.role() == role)
            .count();
        problems.check(n == 1, || {
            format!("{n} Deployments run `keyfleet {role}`, want 1")
        });
    }
    problems.check(
        workloads
            .iter()
            .any(|w| w.manifest.kind() == "Job" && w.role() == "migrate"),
        || "no Job runs `keyfleet migrate`".into(),
    );

    for w in &workloads {
        let at = w.manifest.at();
        let spec = &w.manifest.doc["spec"];
        if w.manifest.kind() == "Deployment" {
            let selector = string_map(&spec["selector"]["matchLabels"]);
            problems.check(w.selected_by(&selector), || {
                format!("{at}: selector {selector:?} does not match its pod labels")
            });
            let autoscaled = scaled_targets.contains(w.manifest.name());
            match spec["replicas"].as_u64() {
                Some(n) => {
                    problems.check(!autoscaled, || {
                        format!("{at}: sets replicas, but a ScaledObject owns its count")
                    });
                    problems.check(n >= 1, || format!("{at}: replicas {n}, want at least 1"));
                }
                None => problems.check(autoscaled, || {
                    format!("{at}: no replicas and no ScaledObject (it would run 1)")
                }),
            }
        }
    }
    problems.assert_none("deploy/k8s");
}

#[test]
fn k8s_containers_listen_probe_and_stop_as_the_binary_expects() {
    let k8s = K8s::load();
    let config_maps = k8s.config_maps();
    let image = image();
    let mut problems = Problems::default();
    for w in workloads(&k8s.manifests) {
        let at = w.manifest.at();
        let long_running = w.manifest.kind() != "Job";
        let pod = w.pod();
        let secret_volumes: BTreeSet<&str> = pod["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter(|v| !v["secret"].is_null() || !v["projected"].is_null())
            .filter_map(|v| v["name"].as_str())
            .collect();
        for container in w.containers() {
            let at = format!(
                "{at}, container {}",
                container["name"].as_str().unwrap_or("?")
            );
            let args = strings(&container["args"]);
            problems.check(container["command"].is_null(), || {
                format!("{at}: sets command; the image's entrypoint is keyfleet, give args")
            });
            for arg in &args {
                problems.check(!secret_looking_arg(arg), || {
                    format!("{at}: argument {arg:?} looks like a secret")
                });
            }
            let image_name = container["image"].as_str().unwrap_or_default();
            problems.check(image_name == "keyfleet", || {
                format!("{at}: image {image_name:?}, want keyfleet (kustomization sets the registry and tag)")
            });

            let env = k8s_env(container, &config_maps, &at, &mut problems);
            let secret_dirs: Vec<String> = container["volumeMounts"]
                .as_sequence()
                .into_iter()
                .flatten()
                .filter(|m| secret_volumes.contains(m["name"].as_str().unwrap_or_default()))
                .filter_map(|m| text(&m["mountPath"]))
                .collect();
            check_env(&env, &secret_dirs, &at, &mut problems);

            check_hardening(container, pod, &image, &at, &mut problems);
            if long_running {
                check_serving(&w, container, &args, &env, &at, &mut problems);
            }
        }
    }
    problems.assert_none("deploy/k8s");
}

#[test]
fn k8s_services_and_disruption_budgets_select_pods_and_ports_that_exist() {
    let k8s = K8s::load();
    let workloads = workloads(&k8s.manifests);
    let mut problems = Problems::default();
    for service in k8s.of_kind("Service") {
        let at = service.at();
        let selector = string_map(&service.doc["spec"]["selector"]);
        let selected: Vec<&Workload> = workloads
            .iter()
            .filter(|w| w.selected_by(&selector))
            .collect();
        problems.check(!selected.is_empty(), || {
            format!("{at}: selects no pods ({selector:?})")
        });
        for port in service.doc["spec"]["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            let target = match &port["targetPort"] {
                Value::Null => port["port"].clone(),
                t => t.clone(),
            };
            for w in &selected {
                problems.check(
                    w.containers().any(|c| resolve_port(c, &target).is_some()),
                    || {
                        format!(
                            "{at}: targetPort {target:?} is not a port of {}",
                            w.manifest.at()
                        )
                    },
                );
            }
        }
    }

    for role in ["api", "worker"] {
        let covered = k8s.of_kind("PodDisruptionBudget").any(|pdb| {
            let selector = string_map(&pdb.doc["spec"]["selector"]["matchLabels"]);
            workloads.iter().any(|w| {
                w.role() == role && w.manifest.kind() == "Deployment" && w.selected_by(&selector)
            })
        });
        problems.check(covered, || {
            format!("no PodDisruptionBudget selects the {role} pods")
        });
    }

    problems.assert_none("deploy/k8s");
}

#[test]
fn k8s_keda_scales_the_workers_on_claimable_jobs_one_concurrency_per_pod() {
    let k8s = K8s::load();
    let workloads = workloads(&k8s.manifests);
    let scaled: Vec<&Manifest> = k8s.of_kind("ScaledObject").collect();
    let mut problems = Problems::default();
    let worker = workloads
        .iter()
        .find(|w| w.manifest.kind() == "Deployment" && w.role() == "worker");
    let concurrency = worker
        .and_then(|w| w.containers().next())
        .and_then(|c| flag(&strings(&c["args"]), "--concurrency").map(str::to_owned));
    problems.check(concurrency.is_some(), || {
        "the worker's args set no --concurrency".into()
    });
    problems.check(scaled.len() == 1, || {
        format!("{} ScaledObjects, want 1 (the workers)", scaled.len())
    });
    for so in &scaled {
        let at = so.at();
        let target = &so.doc["spec"]["scaleTargetRef"];
        problems.check(
            target["kind"].as_str().unwrap_or("Deployment") == "Deployment"
                && worker.is_some_and(|w| target["name"].as_str() == Some(w.manifest.name())),
            || format!("{at}: scaleTargetRef {target:?} is not the worker Deployment"),
        );
        let triggers: Vec<&Value> = so.doc["spec"]["triggers"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter(|t| t["type"].as_str() == Some("prometheus"))
            .collect();
        problems.check(triggers.len() == 1, || {
            format!("{at}: {} prometheus triggers, want 1", triggers.len())
        });
        for trigger in triggers {
            let query = trigger["metadata"]["query"].as_str().unwrap_or_default();
            problems.check(query.contains(SCALING_METRIC), || {
                format!("{at}: the query {query:?} does not read {SCALING_METRIC}")
            });
            let threshold = text(&trigger["metadata"]["threshold"]);
            problems.check(threshold.is_some() && threshold == concurrency, || {
                format!("{at}: threshold {threshold:?} is not the worker's --concurrency {concurrency:?}")
            });
            problems.check(
                trigger["metricType"].as_str().unwrap_or("AverageValue") == "AverageValue",
                || {
                    format!(
                        "{at}: metricType must be AverageValue (replicas = claimable / threshold)"
                    )
                },
            );
        }
    }
    problems.assert_none("deploy/k8s");
}

#[test]
fn the_kustomization_lists_every_manifest_and_image() {
    let dir = deploy_dir().join("k8s");
    let kustomization = documents(&dir.join("kustomization.yaml")).remove(0);
    let listed: BTreeSet<String> = strings(&kustomization["resources"]).into_iter().collect();
    let files: BTreeSet<String> = k8s_files()
        .into_iter()
        .filter(|f| f != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed, files,
        "deploy/k8s/kustomization.yaml resources vs the folder's files"
    );
    let images: BTreeSet<String> = kustomization["images"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|i| text(&i["name"]))
        .collect();
    let manifests = k8s();
    let used: BTreeSet<String> = workloads(&manifests)
        .iter()
        .flat_map(|w| {
            w.containers()
                .filter_map(|c| text(&c["image"]))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        used.is_subset(&images),
        "images {used:?}, kustomization sets {images:?}"
    );
}

// --- Compose ------------------------------------------------------------------------------------

/// Compose's durations: "30s", "1m30s", "500ms".
fn compose_duration_secs(value: &str) -> Option<f64> {
    let mut total = 0.0;
    let mut number = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            continue;
        }
        let mut unit = c.to_string();
        while let Some(u) = chars.next_if(|u| u.is_ascii_alphabetic()) {
            unit.push(u);
        }
        let n: f64 = std::mem::take(&mut number).parse().ok()?;
        total += n * match unit.as_str() {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return None,
        };
    }
    number.is_empty().then_some(total)
}

fn compose_env(service: &Value) -> BTreeMap<String, String> {
    match &service["environment"] {
        Value::Sequence(items) => items
            .iter()
            .filter_map(text)
            .map(|item| match item.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (item, String::new()),
            })
            .collect(),
        other => string_map(other),
    }
}

fn compose() -> Value {
    documents(&deploy_dir().join("compose.yaml")).remove(0)
}

/// The compose services that run the keyfleet image, by name.
fn keyfleet_services(compose: &Value) -> BTreeMap<String, &Value> {
    compose["services"]
        .as_mapping()
        .expect("compose.yaml has services")
        .iter()
        .filter(|(_, s)| {
            s["build"]["dockerfile"]
                .as_str()
                .is_some_and(|d| d.ends_with("deploy/Dockerfile"))
                || s["image"]
                    .as_str()
                    .is_some_and(|i| i.starts_with("keyfleet"))
        })
        .map(|(n, s)| (text(n).unwrap(), s))
        .collect()
}

fn role_of(service: &Value) -> String {
    strings(&service["command"])
        .into_iter()
        .next()
        .unwrap_or_default()
}

#[test]
fn compose_runs_every_role_after_what_it_needs_on_a_safe_redis() {
    let compose = compose();
    let services = compose["services"].as_mapping().unwrap();
    let keyfleet_services = keyfleet_services(&compose);
    let mut problems = Problems::default();
    let migrate = keyfleet_services
        .iter()
        .find(|(_, s)| role_of(s) == "migrate")
        .map(|(n, _)| n.clone());
    for role in ["migrate"].into_iter().chain(LONG_RUNNING) {
        problems.check(
            keyfleet_services.values().any(|s| role_of(s) == role),
            || format!("no compose service runs `keyfleet {role}`"),
        );
    }
    let redis = strings(&compose["services"]["redis"]["command"]);
    for (flag_name, want) in [
        ("--appendonly", "yes"),
        ("--maxmemory-policy", "noeviction"),
    ] {
        problems.check(flag(&redis, flag_name) == Some(want), || {
            format!("redis: command {redis:?} lacks {flag_name} {want}")
        });
    }

    for (name, service) in services {
        let name = text(name).unwrap();
        for (dependency, how) in service["depends_on"].as_mapping().into_iter().flatten() {
            let dependency = text(dependency).unwrap();
            let condition = how["condition"].as_str().unwrap_or("(none)");
            let want = if Some(&dependency) == migrate.as_ref() {
                "service_completed_successfully"
            } else {
                "service_healthy"
            };
            problems.check(condition == want, || {
                format!("{name}: depends on {dependency} with condition {condition}, want {want}")
            });
            problems.check(
                want != "service_healthy"
                    || !compose["services"][dependency.as_str()]["healthcheck"].is_null(),
                || {
                    format!(
                        "{name}: waits for {dependency} to be healthy, which has no healthcheck"
                    )
                },
            );
        }
        problems.check(
            service["depends_on"].is_null() || service["depends_on"].is_mapping(),
            || format!("{name}: depends_on is a list; give each dependency a condition"),
        );
    }

    problems.assert_none("deploy/compose.yaml");
}

#[test]
fn compose_keyfleet_services_serve_health_and_get_secrets_as_files() {
    let compose = compose();
    let image = image();
    let mut problems = Problems::default();
    let declared_secrets = compose["secrets"].as_mapping().cloned().unwrap_or_default();
    for (name, secret) in &declared_secrets {
        if let Some(file) = secret["file"].as_str() {
            problems.check(deploy_dir().join(file).is_file(), || {
                format!("secret {name:?}: file {file} does not exist")
            });
        }
    }
    for (name, service) in &keyfleet_services(&compose) {
        let role = role_of(service);
        let command = strings(&service["command"]);
        for arg in &command {
            problems.check(!secret_looking_arg(arg), || {
                format!("{name}: argument {arg:?} looks like a secret")
            });
        }
        let env = compose_env(service);
        let mounted: Vec<String> = service["secrets"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|s| {
                let source = text(s).or_else(|| text(&s["source"]))?;
                problems.check(declared_secrets.contains_key(source.as_str()), || {
                    format!("{name}: uses secret {source}, which is not declared")
                });
                let target = text(&s["target"]).unwrap_or_else(|| source.clone());
                Some(if target.starts_with('/') {
                    target
                } else {
                    format!("/run/secrets/{target}")
                })
            })
            .collect();
        for (var, value) in env.iter().filter(|(var, _)| var.ends_with("_FILE")) {
            problems.check(mounted.contains(value), || {
                format!("{name}: {var}={value} is not one of its secrets {mounted:?}")
            });
        }
        let secret_dirs: Vec<String> = mounted
            .iter()
            .filter_map(|m| m.rsplit_once('/').map(|(dir, _)| dir.to_owned()))
            .collect();
        check_env(&env, &secret_dirs, name, &mut problems);

        if role == "migrate" {
            let restart = service["restart"].as_str().unwrap_or("no");
            problems.check(restart == "no" || restart == "on-failure", || {
                format!("{name}: restart {restart}: a one-shot that is restarted never completes")
            });
            continue;
        }
        if !LONG_RUNNING.contains(&role.as_str()) {
            continue;
        }
        let listen = listen_port(&command);
        problems.check(listen.is_some(), || {
            format!("{name}: no --listen / --metrics-listen in {command:?}")
        });
        let test = strings(&service["healthcheck"]["test"]);
        let url = test
            .iter()
            .find(|a| a.starts_with("http://"))
            .and_then(|u| url::Url::parse(u).ok());
        problems.check(url.as_ref().is_some_and(|u| u.path() == "/readyz"), || {
            format!("{name}: healthcheck {test:?} does not ask /readyz")
        });
        problems.check(url.as_ref().and_then(|u| u.port()) == listen, || {
            format!(
                "{name}: healthcheck {test:?} asks another port than its listen port {listen:?}"
            )
        });
        let tool = test
            .iter()
            .find(|a| *a != "CMD" && *a != "CMD-SHELL")
            .cloned()
            .unwrap_or_default();
        problems.check(tool == "keyfleet" || image.packages.contains(&tool), || {
            format!(
                "{name}: the healthcheck runs {tool:?}, which the image does not install ({:?})",
                image.packages
            )
        });
        let mut container_ports: Vec<u16> = strings(&service["expose"])
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect();
        for port in service["ports"].as_sequence().into_iter().flatten() {
            let target = text(&port["target"])
                .or_else(|| text(port).map(|p| p.rsplit(':').next().unwrap().to_owned()));
            container_ports.extend(target.and_then(|t| t.split('/').next()?.parse::<u16>().ok()));
        }
        for port in &container_ports {
            problems.check(Some(*port) == listen, || {
                format!("{name}: exposes or publishes {port}, but listens on {listen:?}")
            });
        }
        let grace = shutdown_grace_secs(&env) + STOP_MARGIN_SECS;
        let stop = service["stop_grace_period"]
            .as_str()
            .and_then(compose_duration_secs);
        problems.check(stop.is_some_and(|s| s >= grace as f64), || {
            format!(
                "{name}: stop_grace_period {:?}, want at least {grace}s",
                service["stop_grace_period"]
            )
        });
    }
    problems.assert_none("deploy/compose.yaml");
}

#[test]
fn the_image_runs_keyfleet_as_the_manifests_user() {
    let image = image();
    assert_eq!(
        image.entrypoint.as_deref(),
        Some(r#"["keyfleet"]"#),
        "k8s args and compose commands are keyfleet's"
    );
    assert_eq!(image.user.as_deref(), Some("10001"));
}

#[test]
fn the_helpers_read_what_they_should() {
    let args: Vec<String> = [
        "worker",
        "--concurrency=8",
        "--metrics-listen",
        "0.0.0.0:9100",
    ]
    .map(String::from)
    .into();
    assert_eq!(flag(&args, "--concurrency"), Some("8"));
    assert_eq!(listen_port(&args), Some(9100));
    for secret in [
        "postgres://u@db/x",
        "redis://:pw@r:6379",
        "--api-key",
        "--api-url=https://h/s3cret",
    ] {
        assert!(secret_looking_arg(secret), "{secret}");
    }
    for fine in [
        "redis://redis:6379",
        "--api-key-file",
        "/run/secrets/api-key",
    ] {
        assert!(!secret_looking_arg(fine), "{fine}");
    }
    assert_eq!(compose_duration_secs("1m30s"), Some(90.0));
    assert_eq!(compose_duration_secs("500ms"), Some(0.5));
    assert_eq!(compose_duration_secs("30"), None);
}
