//! Metrics and health endpoints of real worker and scheduler processes (`--metrics-listen`),
//! checked against what the fake servers recorded and what the test put in the queue. The
//! Prometheus text is parsed, not grepped.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use keyfleet_core::{JobPayload, ServerId, SubscriptionId};
use keyfleet_fakevpn::{Endpoint, FakeFleet, FakeServer, FakeServerConfig, ServerKind};
use keyfleet_queue::{Claim, Finish};

use crate::{
    harness::{
        TcpProxy, TestEnv, eventually, redis_url,
        sweeping::{LoggedProcess, spawn_logged, spawn_scheduler_with},
    },
    support::{provision_many, register, subscriptions},
};

const WITHIN: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// The Prometheus text format, parsed
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    pub(crate) name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Every sample of a text-format exposition; `# HELP`/`# TYPE` and other comments are skipped.
/// Panics on a line that is not a valid sample (that is a failure of the exposition).
fn parse_exposition(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|line| parse_sample(line).unwrap_or_else(|e| panic!("bad sample line {line:?}: {e}")))
        .collect()
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = &line[..name_end];
    let valid_name = name.chars().enumerate().all(|(i, c)| {
        c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
    });
    if name.is_empty() || !valid_name {
        return Err(format!("invalid metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let close = loop {
            // label name
            while chars.peek().is_some_and(|(_, c)| *c == ',' || *c == ' ') {
                chars.next();
            }
            match chars.peek() {
                Some((i, '}')) => break *i,
                None => return Err("unterminated label set".into()),
                _ => {}
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key:?} has no quoted value"));
            }
            let mut value = String::new();
            loop {
                match chars.next().map(|(_, c)| c) {
                    Some('"') => break,
                    Some('\\') => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        other => return Err(format!("bad escape {other:?}")),
                    },
                    Some(c) => value.push(c),
                    None => return Err("unterminated label value".into()),
                }
            }
            if labels.insert(key.clone(), value).is_some() {
                return Err(format!("label {key:?} twice"));
            }
        };
        rest = &after[close + 1..];
    }
    let mut fields = rest.split_whitespace();
    let raw = fields.next().ok_or("no value")?;
    let value = match raw {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|e| format!("value {v:?}: {e}"))?,
    };
    if fields.nth(1).is_some() {
        return Err("trailing fields after the timestamp".into());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// A parsed scrape.
pub(crate) struct Scrape {
    pub(crate) samples: Vec<Sample>,
    pub(crate) text: String,
}

impl Scrape {
    /// Samples of `name` whose labels include all of `labels`.
    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum of the matching samples (0 if there are none).
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// The one sample with exactly these labels.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = self
            .matching(name, labels)
            .filter(|s| s.labels.len() == labels.len())
            .collect();
        assert_eq!(
            found.len(),
            1,
            "one sample {name}{labels:?} expected, found {found:?} in:\n{}",
            self.text
        );
        found[0].value
    }
}

pub(crate) async fn get(url: &str) -> Result<(u16, String), reqwest::Error> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let response = client.get(url).send().await?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}

pub(crate) async fn scrape(base: &str) -> Scrape {
    let (status, text) = get(&format!("{base}/metrics"))
        .await
        .expect("/metrics answers");
    assert_eq!(status, 200, "{text}");
    Scrape {
        samples: parse_exposition(&text),
        text,
    }
}

/// `/readyz`: the status and its JSON body.
async fn readyz(base: &str) -> Option<(u16, serde_json::Value)> {
    let (status, body) = get(&format!("{base}/readyz")).await.ok()?;
    Some((
        status,
        serde_json::from_str(&body).expect("/readyz answers JSON"),
    ))
}

#[test]
fn the_parser_reads_the_text_format() {
    let samples = parse_exposition(
        "# HELP a_total Help.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\\\\\\n\"} 3\nb 2.5\nc_bucket{le=\"+Inf\"} 7 1700000000\n\n",
    );
    assert_eq!(samples.len(), 3);
    assert_eq!(samples[0].labels["y"], "q\"\\\n");
    assert_eq!(samples[0].value, 3.0);
    assert_eq!(
        samples[1],
        Sample {
            name: "b".into(),
            labels: BTreeMap::new(),
            value: 2.5
        }
    );
    assert_eq!(samples[2].labels["le"], "+Inf");
    assert!(parse_sample("a{x=1} 2").is_err());
    assert!(parse_sample("a{x=\"1\" 2").is_err());
    assert!(parse_sample("a{x=\"1\"}").is_err());
    assert!(parse_sample("1a 2").is_err());
}

// ---------------------------------------------------------------------------------------------
// Processes with a metrics listener
// ---------------------------------------------------------------------------------------------

/// `keyfleet worker --concurrency N --metrics-listen 127.0.0.1:0`; returns it and its listener's URL.
fn metered_worker(
    env: &TestEnv,
    concurrency: usize,
    extra_env: &[(&str, &str)],
) -> (LoggedProcess, String) {
    let concurrency = concurrency.to_string();
    let mut worker = spawn_logged(
        env,
        &[
            "worker",
            "--concurrency",
            &concurrency,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        extra_env,
    );
    let url = worker.metrics_url(WITHIN);
    (worker, url)
}

/// A scheduler whose only sweep fires on 1 January (never during a test) and a metrics listener.
fn metered_scheduler(env: &TestEnv, extra_env: &[(&str, &str)]) -> (LoggedProcess, String) {
    let mut scheduler = spawn_scheduler_with(
        env,
        &[("reconcile", "0 0 0 1 1 *")],
        &["--metrics-listen", "127.0.0.1:0"],
        extra_env,
    );
    let url = scheduler.metrics_url(WITHIN);
    (scheduler, url)
}

/// The fake server endpoint each request operation of keyfleet's clients reaches.
fn fake_endpoint(kind: ServerKind, operation: &str) -> Endpoint {
    match (kind, operation) {
        (ServerKind::V2ray, "create_user") => Endpoint::CreateUser,
        (ServerKind::V2ray, "list_users") => Endpoint::ListUsers,
        // The health probe is the link of the nil uuid.
        (ServerKind::V2ray, "get_link" | "health") => Endpoint::GetLink,
        (ServerKind::V2ray, "delete_user") => Endpoint::DeleteUser,
        (ServerKind::V2ray, "stats") => Endpoint::Stats,
        (ServerKind::Outline, "server_info" | "health") => Endpoint::ServerInfo,
        (ServerKind::Outline, "create_key_post") => Endpoint::CreateKeyPost,
        (ServerKind::Outline, "create_key_put") => Endpoint::CreateKeyPut,
        // Whether the server takes chosen ids: `GET /access-keys/<probe id>`.
        (ServerKind::Outline, "get_key" | "probe_key_ids") => Endpoint::GetKey,
        (ServerKind::Outline, "list_keys") => Endpoint::ListKeys,
        (ServerKind::Outline, "delete_key") => Endpoint::DeleteKey,
        (ServerKind::Outline, "rename_key") => Endpoint::RenameKey,
        (ServerKind::Outline, "transfer") => Endpoint::Transfer,
        other => panic!("no fake endpoint for {other:?}"),
    }
}

/// A fake's answered status as the metric's class (0 = never answered: `error`).
fn status_class(status: u16) -> String {
    match status {
        0 => "error".to_owned(),
        s => format!("{}xx", s / 100),
    }
}

/// What a fake server recorded, per (endpoint, status class).
fn fake_requests(fake: &FakeServer) -> BTreeMap<(Endpoint, String), u64> {
    let mut seen = BTreeMap::new();
    for request in fake.meter().log {
        *seen
            .entry((request.endpoint, status_class(request.status)))
            .or_default() += 1;
    }
    seen
}

/// What the request-duration histogram counted for `server`, per (fake endpoint, status class).
fn metered_requests(
    scrape: &Scrape,
    server: &str,
    kind: ServerKind,
) -> BTreeMap<(Endpoint, String), u64> {
    let mut seen = BTreeMap::new();
    for s in scrape.matching(
        "keyfleet_vpn_request_duration_seconds_count",
        &[("server", server)],
    ) {
        let endpoint = fake_endpoint(kind, &s.labels["endpoint"]);
        *seen
            .entry((endpoint, s.labels["status"].clone()))
            .or_default() += s.value as u64;
    }
    seen
}

// ---------------------------------------------------------------------------------------------
// The numbers
// ---------------------------------------------------------------------------------------------

/// A worker provisions 12 subscriptions on three servers, one of which refuses its API key (401:
/// its creates die). Its /metrics then says what the fake servers saw: the done jobs per server are
/// the creates each server committed, the request histogram counts each server's requests per
/// endpoint and status class, the dead jobs are on the refusing server, nothing is left ready,
/// and no label holds a secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_metrics_match_what_the_fake_fleet_saw() {
    let env = TestEnv::new().await;
    let fleet = FakeFleet::start(2, 1, |kind, i| {
        FakeServerConfig::new(kind).with_seed(i as u64)
    })
    .await
    .unwrap();
    let (good, refusing, outline) = (&fleet.servers[0], &fleet.servers[1], &fleet.servers[2]);
    register(&env, "m-good", good, 2).await;
    env.ok(&[
        "server",
        "add",
        "--name",
        "m-refusing",
        "--kind",
        "v2ray",
        "--api-url",
        &refusing.api_url(),
        "--api-key",
        "not-the-key",
        "--max-in-flight",
        "2",
    ]);
    register(&env, "m-outline", outline, 3).await;
    let n = 12;
    provision_many(&env, &subscriptions("metered", n)).await;

    let (mut worker, url) = metered_worker(&env, 4, &[]);
    let jobs = 3 * n as u64;
    // Outcomes are counted right after each job's acknowledgement: wait until all are.
    let scrape = eventually(WITHIN, "every job's outcome counted", || async {
        let scrape = scrape(&url).await;
        (scrape.sum("keyfleet_job_outcomes_total", &[]) as u64 == jobs).then_some(scrape)
    })
    .await;
    assert!(worker.is_running());

    let servers = [
        ("m-good", good, ServerKind::V2ray),
        ("m-refusing", refusing, ServerKind::V2ray),
        ("m-outline", outline, ServerKind::Outline),
    ];
    for (name, fake, kind) in servers {
        let meter = fake.meter();
        let done = scrape.sum(
            "keyfleet_job_outcomes_total",
            &[("server", name), ("outcome", "done")],
        );
        assert_eq!(
            done as u64, meter.creates_committed,
            "{name}: done jobs = the creates it committed"
        );
        assert_eq!(
            metered_requests(&scrape, name, kind),
            fake_requests(fake),
            "{name}: requests per endpoint and status, as metered against as the fake recorded"
        );
    }
    assert_eq!(good.meter().creates_committed, n as u64);
    assert_eq!(outline.meter().creates_committed, n as u64);
    assert_eq!(
        scrape.value(
            "keyfleet_job_outcomes_total",
            &[
                ("server", "m-refusing"),
                ("kind", "create_key"),
                ("outcome", "dead")
            ]
        ),
        n as f64
    );
    assert_eq!(
        fake_requests(refusing),
        BTreeMap::from([((Endpoint::CreateUser, "4xx".to_owned()), n as u64)])
    );

    // The fleet gauges, read from Redis at the scrape.
    for (name, dead) in [
        ("m-good", 0.0),
        ("m-refusing", n as f64),
        ("m-outline", 0.0),
    ] {
        for (state, expected) in [
            ("ready", 0.0),
            ("delayed", 0.0),
            ("running", 0.0),
            ("dead", dead),
        ] {
            assert_eq!(
                scrape.value("keyfleet_queue_jobs", &[("server", name), ("state", state)]),
                expected,
                "{name} {state}"
            );
        }
        assert_eq!(
            scrape.value("keyfleet_server_breaker_state", &[("server", name)]),
            0.0
        );
        assert_eq!(
            scrape.value("keyfleet_server_paused", &[("server", name)]),
            0.0
        );
    }
    assert_eq!(
        scrape.value("keyfleet_server_limit_requests", &[("server", "m-outline")]),
        3.0
    );
    assert_eq!(scrape.value("keyfleet_claimable_jobs", &[]), 0.0);

    // Latencies: every create done is in the purchase SLO histogram, every first claim waited.
    let done = 2.0 * n as f64;
    assert_eq!(
        scrape.value(
            "keyfleet_job_latency_seconds_count",
            &[("kind", "create_key")]
        ),
        done
    );
    assert_eq!(
        scrape.value(
            "keyfleet_job_latency_seconds_bucket",
            &[("kind", "create_key"), ("le", "+Inf")]
        ),
        done
    );
    assert_eq!(
        scrape.value(
            "keyfleet_claim_wait_seconds_count",
            &[("kind", "create_key")]
        ),
        jobs as f64
    );
    // Every result reached Postgres through the write-back: 24 keys created, 12 failures recorded.
    assert_eq!(
        scrape.value("keyfleet_writeback_batch_rows_sum", &[]),
        jobs as f64
    );
    let batches = scrape.value("keyfleet_writeback_batch_rows_count", &[]);
    assert!(batches >= 1.0 && batches <= jobs as f64);
    assert_eq!(
        scrape.value("keyfleet_writeback_commit_seconds_count", &[]),
        batches
    );
    assert_eq!(
        scrape.value(
            "keyfleet_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_eq!(scrape.sum("keyfleet_leases_reaped_total", &[]), 0.0);

    // No secret in any label: API keys, the Outline prefix, links.
    let prefix = url::Url::parse(&outline.api_url())
        .unwrap()
        .path()
        .trim_matches('/')
        .to_owned();
    assert!(prefix.len() >= 8, "the fake's Outline prefix: {prefix:?}");
    let mut secrets = vec![prefix, "not-the-key".to_owned()];
    secrets.extend(good.api_key());
    secrets.extend(good.users().into_iter().map(|u| u.link));
    for sample in &scrape.samples {
        for value in sample.labels.values() {
            for secret in &secrets {
                assert!(
                    !value.contains(secret.as_str()),
                    "{sample:?} holds a secret"
                );
            }
            assert!(!value.contains("://"), "{sample:?} holds a URL");
        }
    }
    worker.terminate(Duration::from_secs(30));
    fleet.shutdown().await;
    env.cleanup().await;
}

/// `keyfleet_claimable_jobs` is Σ min(ready + running, limit) over servers with a closed breaker
/// that are not paused, as a scheduler's /metrics reads it while nothing runs the jobs: the test
/// arranges each server's queue through the queue's own operations (the breaker opened by five
/// failures), except the operator's pause, set in Redis as `Queue::pause_server` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimable_jobs_is_the_work_the_limits_allow_on_open_servers() {
    let env = TestEnv::new().await;
    let fleet = FakeFleet::start(4, 0, |_, i| FakeServerConfig::v2ray().with_seed(i as u64))
        .await
        .unwrap();
    let limited = register(&env, "c-limited", &fleet.servers[0], 2).await;
    let running = register(&env, "c-running", &fleet.servers[1], 4).await;
    let paused = register(&env, "c-paused", &fleet.servers[2], 3).await;
    let broken = register(&env, "c-broken", &fleet.servers[3], 3).await;
    let enqueue = |server: ServerId, tag: &'static str, n: usize| {
        let queue = env.queue.clone();
        async move {
            for i in 0..n {
                let sub = SubscriptionId::parse(&format!("{tag}-{i}")).unwrap();
                assert!(
                    queue
                        .enqueue(&JobPayload::create(server, sub))
                        .await
                        .unwrap()
                        .created
                );
            }
        }
    };
    let claim_job = || async {
        loop {
            match env.queue.claim("observe-test").await.unwrap() {
                Claim::Job(job) => return job,
                // The open breaker's cool-down ended before the next claim: the probe fails, the
                // breaker stays open.
                Claim::Probe(server) => {
                    env.queue.probe_result(server, false).await.unwrap();
                }
                other => panic!("expected a job, got {other:?}"),
            }
        }
    };
    // c-broken: five transient failures open its breaker (their retries wait an hour); 2 more wait.
    enqueue(broken, "broken", 7).await;
    for _ in 0..env.queue.config().breaker_threshold {
        let job = claim_job().await;
        assert_eq!(job.server, broken);
        let retry = Finish::Retry {
            delay: Duration::from_secs(3600),
            error: "test: 503".into(),
            server_fault: true,
        };
        env.queue.finish(&job, &retry).await.unwrap();
    }
    // c-running: 3 jobs, one claimed (the only server with a claimable job).
    enqueue(running, "running", 3).await;
    assert_eq!(claim_job().await.server, running);
    enqueue(limited, "limited", 5).await;
    enqueue(paused, "paused", 4).await;
    env.queue.pause_server(paused).await.unwrap();

    let (mut scheduler, url) = metered_scheduler(&env, &[]);
    let scrape = scrape(&url).await;
    // c-limited: min(5 + 0, 2) = 2; c-running: min(2 + 1, 4) = 3; the paused and the open: 0.
    assert_eq!(
        scrape.value("keyfleet_claimable_jobs", &[]),
        5.0,
        "{}",
        scrape.text
    );
    let state = |server: &str, state: &str| {
        scrape.value(
            "keyfleet_queue_jobs",
            &[("server", server), ("state", state)],
        )
    };
    assert_eq!(
        (state("c-limited", "ready"), state("c-limited", "running")),
        (5.0, 0.0)
    );
    assert_eq!(
        (state("c-running", "ready"), state("c-running", "running")),
        (2.0, 1.0)
    );
    assert_eq!(
        (state("c-paused", "ready"), state("c-paused", "running")),
        (4.0, 0.0)
    );
    assert_eq!(
        (state("c-broken", "ready"), state("c-broken", "delayed")),
        (2.0, 5.0)
    );
    let gauge = |metric: &str, server: &str| scrape.value(metric, &[("server", server)]);
    assert_eq!(
        gauge("keyfleet_server_in_flight_requests", "c-running"),
        1.0
    );
    assert_eq!(gauge("keyfleet_server_limit_requests", "c-limited"), 2.0);
    assert_eq!(gauge("keyfleet_server_breaker_state", "c-broken"), 1.0);
    assert_eq!(gauge("keyfleet_server_breaker_state", "c-paused"), 0.0);
    assert_eq!(gauge("keyfleet_server_paused", "c-paused"), 1.0);
    assert_eq!(gauge("keyfleet_server_paused", "c-broken"), 0.0);
    // A scheduler has no claim loop to report.
    let (status, body) = readyz(&url).await.unwrap();
    assert_eq!(
        (status, body),
        (200, serde_json::json!({"postgres": "ok", "redis": "ok"}))
    );
    scheduler.terminate(Duration::from_secs(30));
    fleet.shutdown().await;
    env.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// Readiness
// ---------------------------------------------------------------------------------------------

/// The loopback address of a `postgres://` or `redis://` URL.
fn upstream_of(url: &str) -> SocketAddr {
    let url = url::Url::parse(url).unwrap();
    let addr: SocketAddr = format!(
        "{}:{}",
        url.host_str().unwrap(),
        url.port_or_known_default().unwrap_or(6379)
    )
    .parse()
    .unwrap();
    assert!(addr.ip().is_loopback(), "only ever 127.0.0.1");
    addr
}

fn with_port(url: &str, port: u16) -> String {
    let mut url = url::Url::parse(url).unwrap();
    url.set_port(Some(port)).unwrap();
    url.to_string()
}

/// Waits until `/readyz` answers `status` with a body `accept` takes; returns the body.
async fn ready_state(
    base: &str,
    status: u16,
    what: &str,
    accept: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    eventually(WITHIN, what, || async {
        let (got, body) = readyz(base).await?;
        (got == status && accept(&body)).then_some(body)
    })
    .await
}

/// `/readyz` of a process whose Redis and Postgres connections go through proxies the test cuts:
/// 200 with every check ok, then 503 naming redis while Redis is cut, 200 again, then 503
/// naming postgres while Postgres is cut. `/healthz` stays 200 and `/metrics` keeps answering.
async fn readiness_follows_the_connections(env: &TestEnv, worker: bool) {
    let redis = TcpProxy::start(upstream_of(&redis_url())).await;
    let postgres = TcpProxy::start(upstream_of(&env.database_url)).await;
    let redis_through = with_port(&redis_url(), redis.port);
    let postgres_through = with_port(&env.database_url, postgres.port);
    let extra = [
        ("REDIS_URL", redis_through.as_str()),
        ("DATABASE_URL", postgres_through.as_str()),
    ];
    let (mut process, url) = if worker {
        metered_worker(env, 2, &extra)
    } else {
        metered_scheduler(env, &extra)
    };
    let all_ok = |body: &serde_json::Value| {
        let mut expected = serde_json::json!({"postgres": "ok", "redis": "ok"});
        if worker {
            expected["claim_loop"] = "ok".into();
        }
        *body == expected
    };
    ready_state(&url, 200, "ready", all_ok).await;

    redis.cut();
    let body = ready_state(&url, 503, "not ready: redis", |b| {
        b["redis"] != "ok" && b["postgres"] == "ok"
    })
    .await;
    assert!(body["redis"].is_string(), "{body}");
    let (status, _) = get(&format!("{url}/healthz")).await.unwrap();
    assert_eq!(status, 200, "the process runs");
    // /metrics still answers, without the fleet gauges it cannot read.
    let during = scrape(&url).await;
    assert!(
        during.text.contains("# keyfleet: fleet gauges unavailable"),
        "{}",
        during.text
    );
    assert_eq!(during.matching("keyfleet_claimable_jobs", &[]).count(), 0);
    redis.restore();
    ready_state(&url, 200, "ready again after Redis", all_ok).await;

    postgres.cut();
    ready_state(&url, 503, "not ready: postgres", |b| {
        b["postgres"] != "ok" && b["redis"] == "ok"
    })
    .await;
    postgres.restore();
    ready_state(&url, 200, "ready again after Postgres", all_ok).await;
    assert!(process.is_running(), "{}", process.log());
    process.terminate(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_not_ready_while_redis_or_postgres_is_unreachable() {
    let env = TestEnv::new().await;
    readiness_follows_the_connections(&env, true).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_is_not_ready_while_redis_or_postgres_is_unreachable() {
    let env = TestEnv::new().await;
    readiness_follows_the_connections(&env, false).await;
    env.cleanup().await;
}

/// Without `--metrics-listen` nothing listens and nothing is printed.
#[tokio::test]
async fn no_listener_without_the_flag() {
    let env = TestEnv::new().await;
    let out = env.run(&["worker", "--metrics-listen", "not-an-address"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--metrics-listen"));
    let mut scheduler = spawn_scheduler_with(&env, &[("reconcile", "0 0 0 1 1 *")], &[], &[]);
    eventually(WITHIN, "the scheduler to start", || async {
        scheduler
            .events()
            .iter()
            .any(|e| e["fields"]["message"] == "Scheduler started.")
            .then_some(())
    })
    .await;
    assert_eq!(scheduler.stdout(), "");
    scheduler.terminate(Duration::from_secs(30));
    env.cleanup().await;
}
