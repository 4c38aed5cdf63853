//! deploy/k8s against the real binary: each long-running role, started with its Deployment's
//! arguments and its ConfigMap's settings, answers the paths its probes ask, and every role the
//! metrics Service selects exports the series the KEDA ScaledObject's query reads.
//! (`cargo test --test deploy` checks that the manifests agree with each other; this checks that
//! they agree with what the processes do.)

use std::{collections::BTreeMap, path::Path, time::Duration};

use keyfleet_fakevpn::{FakeServer, FakeServerConfig};
use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::{
    harness::{
        TestEnv, eventually,
        sweeping::{LoggedProcess, spawn_logged},
    },
    observe::{get, scrape},
};

const WITHIN: Duration = Duration::from_secs(20);

/// Every document of every manifest in deploy/k8s.
fn manifests() -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/k8s");
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") && !path.ends_with("kustomization.yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            for doc in serde_yaml_ng::Deserializer::from_str(&text) {
                docs.push(Value::deserialize(doc).unwrap());
            }
        }
    }
    docs
}

fn of_kind<'a>(docs: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> {
    docs.iter()
        .filter(move |d| d["kind"].as_str() == Some(kind))
}

fn string_map(value: &Value) -> BTreeMap<String, String> {
    value
        .as_mapping()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                other => serde_yaml_ng::to_string(other).ok()?.trim().to_owned(),
            };
            Some((k.as_str()?.to_owned(), v))
        })
        .collect()
}

/// A Deployment's one container as the test starts it.
struct Role {
    args: Vec<String>,
    labels: BTreeMap<String, String>,
    probe_paths: Vec<String>,
}

fn roles(docs: &[Value]) -> Vec<Role> {
    of_kind(docs, "Deployment")
        .map(|d| {
            let template = &d["spec"]["template"];
            let container = &template["spec"]["containers"][0];
            let args = container["args"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_owned())
                .collect();
            let probe_paths = ["livenessProbe", "readinessProbe", "startupProbe"]
                .iter()
                .filter_map(|p| container[*p]["httpGet"]["path"].as_str())
                .map(str::to_owned)
                .collect();
            Role {
                args,
                labels: string_map(&template["metadata"]["labels"]),
                probe_paths,
            }
        })
        .collect()
}

/// The `keyfleet_*` series a PromQL query reads.
fn metrics_in(query: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = query;
    while let Some(at) = rest.find("keyfleet_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}

/// The role started as its manifest starts it, listening on a port of its own; returns the
/// process and its base URL.
fn start(env: &TestEnv, role: &Role, settings: &[(&str, &str)]) -> (LoggedProcess, String) {
    let args: Vec<&str> = role
        .args
        .iter()
        .map(|a| {
            if a.starts_with("0.0.0.0:") {
                "127.0.0.1:0"
            } else {
                a.as_str()
            }
        })
        .collect();
    let mut process = spawn_logged(env, &args, settings);
    let url = if args[0] == "api" {
        process.await_stdout_line("keyfleet api listening on ", WITHIN)
    } else {
        process.metrics_url(WITHIN)
    };
    (process, url)
}

#[tokio::test]
async fn each_role_answers_its_probes_and_exports_what_the_autoscaler_reads() {
    let env = TestEnv::new().await;
    let fake = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    env.add_server("s1", &fake, 4);
    let docs = manifests();
    // The ConfigMap's settings, except where to find the database, Redis and the key prefix:
    // the test's own.
    let config: Vec<(String, String)> = of_kind(&docs, "ConfigMap")
        .flat_map(|c| string_map(&c["data"]))
        .filter(|(k, _)| !k.ends_with("_FILE") && k != "KEYFLEET_REDIS_PREFIX")
        .collect();
    assert!(
        config
            .iter()
            .any(|(k, _)| k == "KEYFLEET_SHUTDOWN_GRACE_MS"),
        "{config:?}"
    );
    let settings: Vec<(&str, &str)> = config
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let scraped_selector = of_kind(&docs, "Service")
        .find(|s| s["metadata"]["name"].as_str() == Some("keyfleet-metrics"))
        .map(|s| string_map(&s["spec"]["selector"]))
        .expect("the keyfleet-metrics Service");
    let wanted: Vec<String> = of_kind(&docs, "ScaledObject")
        .flat_map(|so| so["spec"]["triggers"].as_sequence().unwrap().clone())
        .flat_map(|t| metrics_in(t["metadata"]["query"].as_str().unwrap()))
        .collect();
    assert!(
        !wanted.is_empty(),
        "the ScaledObject's query reads no keyfleet_ series"
    );

    let roles = roles(&docs);
    let names: Vec<&str> = roles.iter().map(|r| r.args[0].as_str()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    let mut scraped = 0;
    for role in &roles {
        let (mut process, url) = start(&env, role, &settings);
        for path in &role.probe_paths {
            eventually(
                WITHIN,
                &format!("{} answering {path}", role.args[0]),
                || async {
                    match get(&format!("{url}{path}")).await {
                        Ok((200, _)) => Some(()),
                        _ => None,
                    }
                },
            )
            .await;
        }
        let selected = scraped_selector
            .iter()
            .all(|(k, v)| role.labels.get(k) == Some(v));
        if selected {
            scraped += 1;
            let scrape = scrape(&url).await;
            for metric in &wanted {
                assert!(
                    scrape.samples.iter().any(|s| &s.name == metric),
                    "{} exports no {metric}:\n{}",
                    role.args[0],
                    scrape.text
                );
            }
        }
        let status = process.terminate(WITHIN);
        assert!(
            status.success(),
            "{}: {status}\n{}",
            role.args[0],
            process.log()
        );
    }
    assert!(scraped > 0, "the metrics Service selects no role");
    env.cleanup().await;
}
