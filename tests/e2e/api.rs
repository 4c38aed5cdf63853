//! `keyfleet api` as the purchase service and operators use it: the real api and worker binaries,
//! real Postgres and Redis, the fake fleet. Assertions read the fake servers, Postgres and Redis.

use std::{collections::HashMap, time::Duration};

use keyfleet_fakevpn::{FakeFleet, FakeServer, FakeServerConfig, Fault, Latency, ServerKind};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{
    TestEnv, drained, eventually,
    sweeping::{LoggedProcess, spawn_logged, spawn_worker},
};

/// A running `keyfleet api` and the tokens to call it with.
struct Api {
    _process: LoggedProcess,
    base: String,
    http: reqwest::Client,
    admin: String,
    producer: String,
}

impl Api {
    fn start(env: &TestEnv, extra_env: &[(&str, &str)]) -> Self {
        let mut process = spawn_logged(env, &["api", "--listen", "127.0.0.1:0"], extra_env);
        let base = process.await_stdout_line("keyfleet api listening on ", Duration::from_secs(30));
        Self {
            _process: process,
            base,
            http: reqwest::Client::new(),
            admin: token(env, "ops", "admin"),
            producer: token(env, "shop", "producer"),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("the api answers");
        let status = response.status();
        let text = response.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    /// A purchase with an empty body, waiting up to `wait_ms`.
    async fn buy(&self, sub: &str, wait_ms: u64) -> (StatusCode, Value) {
        let path = format!("/v1/subscriptions/{sub}/provision?wait_ms={wait_ms}");
        self.call(Method::POST, &path, &self.producer, Some(json!({})))
            .await
    }

    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call(method, path, &self.admin, body).await
    }

    async fn provision(&self, sub: &str, order: Option<&str>, body: Value) -> (StatusCode, Value) {
        let mut request = self
            .http
            .post(format!(
                "{}/v1/subscriptions/{sub}/provision?wait_ms=5000",
                self.base
            ))
            .bearer_auth(&self.producer)
            .json(&body);
        if let Some(order) = order {
            request = request.header("Idempotency-Key", order);
        }
        let response = request.send().await.expect("the api answers");
        (response.status(), response.json().await.unwrap())
    }
}

/// `keyfleet token create` as an operator runs it: the token is the last line of stdout.
pub(crate) fn token(env: &TestEnv, name: &str, role: &str) -> String {
    let out = env.ok(&["token", "create", "--name", name, "--role", role]);
    out.lines().last().unwrap().trim().to_owned()
}

pub(crate) async fn fleet(v2ray: usize, outline: usize, latency: Latency) -> FakeFleet {
    FakeFleet::start(v2ray, outline, |kind, _| FakeServerConfig {
        latency: latency.clone(),
        ..FakeServerConfig::new(kind)
    })
    .await
    .unwrap()
}

pub(crate) fn register(env: &TestEnv, fleet: &FakeFleet, max_in_flight: u32) {
    for (i, fake) in fleet.servers.iter().enumerate() {
        env.add_server(&format!("s{i}"), fake, max_in_flight);
    }
}

fn links_by_server(view: &Value) -> HashMap<String, String> {
    view["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["server"].as_str().unwrap().to_owned(),
                k["link"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn creates(fleet: &FakeFleet) -> u64 {
    fleet.total_meter().creates_committed
}

#[tokio::test]
async fn a_purchase_gets_every_link_in_one_call_and_a_repeat_creates_nothing() {
    let env = TestEnv::new().await;
    let fleet = fleet(10, 1, Latency::Zero).await;
    register(&env, &fleet, 4);
    let api = Api::start(&env, &[]);
    let _worker = spawn_worker(&env, 44, &[]);

    let (status, first) = api
        .provision(
            "order-4711",
            Some("order-4711"),
            json!({"expires_at": "2030-01-31T00:00:00Z"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["complete"], true);
    let links = links_by_server(&first);
    assert_eq!(links.len(), 11);
    for (i, fake) in fleet.servers.iter().enumerate() {
        let users = fake.users();
        assert_eq!(users.len(), 1, "one key on s{i}");
        assert_eq!(
            links[&format!("s{i}")],
            users[0].link,
            "s{i}'s link is the server's"
        );
    }
    // What the call answered is what Postgres holds.
    let stored: Vec<(String, String)> = sqlx::query_as(
        "SELECT state, link FROM keys WHERE subscription_id = 'order-4711' ORDER BY server_id",
    )
    .fetch_all(env.store.pool())
    .await
    .unwrap();
    assert_eq!(stored.len(), 11);
    assert!(
        stored
            .iter()
            .all(|(state, link)| state == "active" && links.values().any(|l| l == link))
    );

    // The purchase service retries the same order: the same receipt, nothing new anywhere. (The
    // answer came once the keys were in Postgres; the worker may still be recording the jobs as
    // done in Redis.)
    let jobs_before = drained(&env, 11, Duration::from_secs(30)).await;
    let before = fleet.total_meter();
    let (status, again) = api
        .provision(
            "order-4711",
            Some("order-4711"),
            json!({"expires_at": "2030-01-31T00:00:00Z"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["receipt"], first["receipt"]);
    assert_eq!(fleet.total_meter().total_requests, before.total_requests);
    assert_eq!(env.queue.stats().await.unwrap(), jobs_before);

    // The same order id with another request is refused, and changes nothing.
    let (status, conflict) = api
        .provision(
            "order-4711",
            Some("order-4711"),
            json!({"expires_at": "2031-01-31T00:00:00Z"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{conflict}");
    let expires: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT expires_at FROM subscriptions WHERE id = 'order-4711'")
            .fetch_one(env.store.pool())
            .await
            .unwrap();
    assert_eq!(expires.to_rfc3339(), "2030-01-31T00:00:00+00:00");

    // Read back, then cancel: deprovision waits for the deletes.
    let (status, read) = api
        .call(
            Method::GET,
            "/v1/subscriptions/order-4711",
            &api.producer,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(links_by_server(&read), links);
    let (status, gone) = api
        .call(
            Method::POST,
            "/v1/subscriptions/order-4711/deprovision?wait_ms=5000",
            &api.producer,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{gone}");
    assert!(fleet.servers.iter().all(|f| f.users().is_empty()));
    assert_eq!(creates(&fleet), 11, "never a duplicate create");

    fleet.shutdown().await;
    env.cleanup().await;
}

#[tokio::test]
async fn two_hundred_concurrent_waiting_purchases_all_complete() {
    let env = TestEnv::new().await;
    let fleet = fleet(10, 1, Latency::Fixed(Duration::from_millis(2))).await;
    register(&env, &fleet, 4);
    let api = Api::start(&env, &[]);
    let _worker = spawn_worker(&env, 44, &[]);

    let purchases = (0..200).map(|i| {
        let api = &api;
        async move {
            let request = api
                .http
                .post(format!(
                    "{}/v1/subscriptions/c{i}/provision?wait_ms=30000",
                    api.base
                ))
                .bearer_auth(&api.producer)
                .header("Idempotency-Key", format!("order-{i}"));
            let response = request.send().await.unwrap();
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            (i, status, body)
        }
    });
    let answers = futures::future::join_all(purchases).await;
    for (i, status, body) in &answers {
        assert_eq!(*status, StatusCode::OK, "purchase {i}: {body}");
        let links = links_by_server(body);
        assert_eq!(links.len(), 11, "purchase {i}");
        assert!(
            links.values().all(|l| !l.is_empty()),
            "purchase {i}: {body}"
        );
    }
    let active: i64 = sqlx::query_scalar("SELECT count(*) FROM keys WHERE state = 'active'")
        .fetch_one(env.store.pool())
        .await
        .unwrap();
    assert_eq!(active, 2200);
    assert_eq!(creates(&fleet), 2200);
    assert_eq!(fleet.total_meter().duplicates, 0);

    fleet.shutdown().await;
    env.cleanup().await;
}

#[tokio::test]
async fn tokens_roles_and_bad_input_are_refused_with_nothing_written() {
    let env = TestEnv::new().await;
    let fake = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    let api = Api::start(&env, &[]);
    let viewer = token(&env, "dashboard", "viewer");
    let rival = token(&env, "other-shop", "producer");

    // No token, a bad one, a revoked one.
    let response = api
        .http
        .get(format!("{}/v1/servers", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let (status, _) = api.call(Method::GET, "/v1/servers", "kf_0000", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let doomed = token(&env, "doomed", "admin");
    env.ok(&["token", "revoke", "doomed"]);
    let (status, _) = api.call(Method::GET, "/v1/servers", &doomed, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Wrong roles.
    let (status, body) = api
        .call(Method::GET, "/v1/servers", &api.producer, None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) = api.call(Method::GET, "/v1/servers", &viewer, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = api
        .call(Method::POST, "/v1/servers/x/pause", &viewer, None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = api
        .call(
            Method::POST,
            "/v1/subscriptions/a1/provision",
            &viewer,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Malformed JSON, a bad field, a bad id, a bad server URL: 4xx naming the field.
    let raw = api
        .http
        .post(format!("{}/v1/subscriptions/a1/provision", api.base))
        .bearer_auth(&api.producer)
        .header("content-type", "application/json")
        .body("{\"expires_at\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), StatusCode::BAD_REQUEST);
    let body: Value = raw.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_json");
    let cases = [
        (
            "/v1/subscriptions/a1/provision",
            json!({"expires_at": "next tuesday"}),
            "expires_at",
        ),
        (
            "/v1/subscriptions/a1/provision",
            json!({"expires_at": "2001-01-01T00:00:00Z"}),
            "expires_at",
        ),
        (
            "/v1/subscriptions/a1/provision",
            json!({"expiry": "2030-01-01T00:00:00Z"}),
            ".",
        ),
        ("/v1/subscriptions/not%20valid!/provision", json!({}), "id"),
        (
            "/v1/subscriptions/a1/provision?wait_ms=30001",
            json!({}),
            "wait_ms",
        ),
    ];
    for (path, body, field) in cases {
        let (status, answer) = api
            .call(Method::POST, path, &api.producer, Some(body))
            .await;
        assert!(status.is_client_error(), "{path}: {status} {answer}");
        if field != "." {
            assert_eq!(answer["error"]["field"], field, "{path}: {answer}");
        } else {
            assert!(
                answer["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("expiry"),
                "{answer}"
            );
        }
    }
    let bad_servers = [
        (
            json!({"name": "x", "kind": "v2ray", "api_url": "ftp://h", "api_key": "k"}),
            "api_url",
        ),
        (
            json!({"name": "x", "kind": "v2ray", "api_url": "not a url", "api_key": "k"}),
            "api_url",
        ),
        (
            json!({"name": "x", "kind": "wireguard", "api_url": "http://h", "api_key": "k"}),
            "kind",
        ),
        (
            json!({"name": "x y", "kind": "v2ray", "api_url": "http://h", "api_key": "k"}),
            "name",
        ),
        (
            json!({"name": "x", "kind": "v2ray", "api_url": "http://h"}),
            "api_key",
        ),
        (
            json!({"name": "x", "kind": "v2ray", "api_url": "http://h", "api_key": "k", "max_in_flight": 0}),
            "max_in_flight",
        ),
        (
            json!({"name": "x", "kind": "v2ray", "api_url": "http://h", "api_key": "k", "max_in_flight": "four"}),
            "max_in_flight",
        ),
        (
            json!({"name": "x", "kind": "xray-grpc", "api_url": "http://h:10085"}),
            "inbound_tag",
        ),
        (
            json!({"name": "x", "kind": "xray-grpc", "api_url": "http://h:10085",
                   "grpc": {"inbound_tag": "in", "link_address": "h", "link_port": 0}}),
            "link_port",
        ),
        (
            json!({"name": "x", "kind": "xray-grpc", "api_url": "https://h:10085",
                   "grpc": {"inbound_tag": "in", "link_address": "h", "link_port": 443}}),
            "api_url",
        ),
        (
            json!({"name": "x", "kind": "v2ray", "api_url": "http://h", "api_key": "k",
                   "grpc": {"inbound_tag": "in"}}),
            "inbound_tag",
        ),
    ];
    for (body, field) in bad_servers {
        let (status, answer) = api
            .admin(Method::POST, "/v1/servers", Some(body.clone()))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {answer}");
        assert_eq!(answer["error"]["field"], field, "{body}: {answer}");
    }
    let huge = json!({"expires_at": "x".repeat(100_000)});
    let (status, _) = api
        .call(
            Method::POST,
            "/v1/subscriptions/a1/provision",
            &api.producer,
            Some(huge),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // Nothing half-written: no subscription, no server, no job.
    let subscriptions: i64 = sqlx::query_scalar("SELECT count(*) FROM subscriptions")
        .fetch_one(env.store.pool())
        .await
        .unwrap();
    let servers: i64 = sqlx::query_scalar("SELECT count(*) FROM servers")
        .fetch_one(env.store.pool())
        .await
        .unwrap();
    assert_eq!((subscriptions, servers), (0, 0));
    assert_eq!(env.queue.stats().await.unwrap().ready, 0);

    // A good server, and a subscription of one producer that another may not touch.
    let server = json!({"name": "de-1", "kind": "v2ray", "api_url": fake.api_url(), "api_key": fake.api_key()});
    let (status, created) = api
        .admin(Method::POST, "/v1/servers", Some(server.clone()))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert!(
        !created.to_string().contains(&fake.api_key().unwrap()),
        "no credential in a response"
    );
    let (status, _) = api.admin(Method::POST, "/v1/servers", Some(server)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let node = json!({"name": "fi-1", "kind": "xray-grpc", "api_url": "http://127.0.0.1:10085",
        "grpc": {"inbound_tag": "vless-in", "link_address": "fi-1.example.net", "link_port": 443}});
    let (status, created) = api.admin(Method::POST, "/v1/servers", Some(node)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["grpc"]["inbound_tag"], "vless-in", "{created}");
    assert_eq!(created["grpc"]["link"]["port"], 443, "{created}");
    let secret = env
        .store
        .server_by_name("fi-1")
        .await
        .unwrap()
        .key_secret
        .unwrap();
    assert!(
        !created.to_string().contains(&secret),
        "no key secret in a response"
    );
    let (status, _) = api.buy("mine", 0).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    for (method, path) in [
        (Method::GET, "/v1/subscriptions/mine"),
        (Method::POST, "/v1/subscriptions/mine/provision"),
        (Method::POST, "/v1/subscriptions/mine/deprovision"),
    ] {
        let body = json!({"expires_at": "2100-01-01T00:00:00Z"});
        let (status, answer) = api.call(method, path, &rival, Some(body)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {answer}");
    }
    let (state, expires_at): (String, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("SELECT status, expires_at FROM subscriptions WHERE id = 'mine'")
            .fetch_one(env.store.pool())
            .await
            .unwrap();
    assert_eq!(
        (state.as_str(), expires_at),
        ("active", None),
        "the rival's provision and deprovision changed nothing"
    );
    let (status, _) = api.admin(Method::GET, "/v1/subscriptions/mine", None).await;
    assert_eq!(status, StatusCode::OK);

    fake.shutdown().await;
    env.cleanup().await;
}

#[tokio::test]
async fn each_token_has_a_rate_limit_with_retry_after() {
    let env = TestEnv::new().await;
    let api = Api::start(
        &env,
        &[
            ("KEYFLEET_API_RATE_PER_SEC", "1"),
            ("KEYFLEET_API_RATE_BURST", "3"),
        ],
    );
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..5 {
        let response = api
            .http
            .get(format!("{}/v1/servers", api.base))
            .bearer_auth(&api.admin)
            .send()
            .await
            .unwrap();
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            retry_after = response.headers().get("retry-after").cloned();
        }
        statuses.push(response.status());
    }
    // A burst of 3 at one per second: at most one more can have been earned in the meantime.
    assert!(
        statuses[..3].iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(
        statuses.last(),
        Some(&StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    let secs: u64 = retry_after.unwrap().to_str().unwrap().parse().unwrap();
    assert!(secs >= 1);
    // Another token has its own budget.
    let (status, _) = api
        .call(
            Method::GET,
            "/v1/servers",
            &token(&env, "ops2", "admin"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    env.cleanup().await;
}

#[tokio::test]
async fn server_changes_through_the_api_reach_running_workers() {
    let env = TestEnv::new().await;
    let fake = FakeServer::start(FakeServerConfig {
        latency: Latency::Fixed(Duration::from_millis(20)),
        ..FakeServerConfig::new(ServerKind::V2ray)
    })
    .await
    .unwrap();
    env.add_server("de-1", &fake, 8);
    let api = Api::start(&env, &[]);
    let _worker = spawn_worker(&env, 16, &[("KEYFLEET_SERVER_REFRESH_MS", "100")]);

    // A lower limit holds in the worker that is already running.
    let (status, patched) = api
        .admin(
            Method::PATCH,
            "/v1/servers/de-1",
            Some(json!({"max_in_flight": 2})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["max_in_flight"], 2);
    for i in 0..30 {
        let (status, _) = api
            .call(
                Method::POST,
                &format!("/v1/subscriptions/l{i}/provision"),
                &api.producer,
                Some(json!({})),
            )
            .await;
        assert!(status.is_success());
    }
    wait_active(&env, 30).await;
    let meter = fake.meter();
    assert_eq!(meter.creates_committed, 30);
    assert_eq!(meter.peak_in_flight, 2, "the new limit held fleet-wide");

    // New credentials are used without a restart: a wrong key makes the next create fail with
    // 401 (dead at once), the right one makes its replay succeed.
    let (status, _) = api
        .admin(
            Method::PATCH,
            "/v1/servers/de-1",
            Some(json!({"api_key": "wrong"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // The worker picks the change up at its next refresh; until then a create may still succeed.
    // So provision until one fails on the wrong key.
    let mut failed = None;
    for i in 0..200 {
        let sub = format!("k{i}");
        let (_, view) = api.buy(&sub, 5000).await;
        if view["keys"][0]["state"] == "failed" {
            failed = Some((sub, view));
            break;
        }
    }
    let (sub, view) = failed.expect("a create with the wrong key failed");
    assert!(
        view["keys"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("401"),
        "{view}"
    );
    assert!(
        !view.to_string().contains("wrong"),
        "the key is not echoed: {view}"
    );
    let (status, _) = api
        .admin(
            Method::PATCH,
            "/v1/servers/de-1",
            Some(json!({"api_key": fake.api_key()})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // Once a fresh purchase succeeds, the worker uses the right key again.
    let mut fresh = 0;
    eventually(
        Duration::from_secs(30),
        "a create with the restored key",
        || {
            fresh += 1;
            let path = format!("/v1/subscriptions/r{fresh}/provision?wait_ms=5000");
            let api = &api;
            async move {
                let (status, _) = api
                    .call(Method::POST, &path, &api.producer, Some(json!({})))
                    .await;
                (status == StatusCode::OK).then_some(())
            }
        },
    )
    .await;
    let (status, replay) = api
        .admin(
            Method::POST,
            "/v1/dead-jobs/replay",
            Some(json!({"server": "de-1"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{replay}");
    // The first failure, and any purchase that raced the restored key.
    assert!(
        !replay["replayed"].as_array().unwrap().is_empty(),
        "{replay}"
    );
    let (status, done) = api.buy(&sub, 5000).await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert!(
        fake.users()
            .iter()
            .any(|u| u.link == done["keys"][0]["link"])
    );

    fake.shutdown().await;
    env.cleanup().await;
}

async fn wait_active(env: &TestEnv, n: i64) {
    eventually(Duration::from_secs(60), "keys active", || async {
        let active: i64 = sqlx::query_scalar("SELECT count(*) FROM keys WHERE state = 'active'")
            .fetch_one(env.store.pool())
            .await
            .unwrap();
        (active == n).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_paused_server_gets_no_requests_until_resumed() {
    let env = TestEnv::new().await;
    let fleet = fleet(2, 0, Latency::Zero).await;
    register(&env, &fleet, 4);
    let api = Api::start(&env, &[]);
    let _worker = spawn_worker(&env, 8, &[]);

    let (status, paused) = api.admin(Method::POST, "/v1/servers/s0/pause", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(paused["paused"], true);
    // s1 is served while s0 holds its job: claims are round-robin over servers, so had s0 been
    // claimable its job would have gone first or alongside.
    let (status, view) = api.buy("p1", 100).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{view}");
    wait_active(&env, 1).await;
    for _ in 0..3 {
        let (status, _) = api.admin(Method::POST, "/v1/sweeps/configs", None).await;
        assert_eq!(status, StatusCode::OK);
    }
    let (_, queue) = api.admin(Method::GET, "/v1/queue", None).await;
    let s0 = queue["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["server"] == "s0")
        .unwrap();
    assert_eq!(
        (s0["paused"].as_bool(), s0["ready"].as_u64()),
        (Some(true), Some(1)),
        "{queue}"
    );
    assert_eq!(
        fleet.servers[0].meter().total_requests,
        0,
        "nothing reached the paused server"
    );

    let (status, _) = api.admin(Method::POST, "/v1/servers/s0/resume", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, view) = api.buy("p1", 5000).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(fleet.servers[0].users().len(), 1);
    let paused_in_pg: bool = sqlx::query_scalar("SELECT paused FROM servers WHERE name = 's0'")
        .fetch_one(env.store.pool())
        .await
        .unwrap();
    assert!(!paused_in_pg);

    fleet.shutdown().await;
    env.cleanup().await;
}

#[tokio::test]
async fn dead_jobs_are_listed_replayed_and_discarded_through_the_api() {
    let env = TestEnv::new().await;
    let fake = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    env.add_server("de-1", &fake, 4);
    let api = Api::start(&env, &[]);
    let _worker = spawn_worker(&env, 4, &[]);
    fake.inject(None, Fault::Status(401), 2);
    for sub in ["d1", "d2"] {
        api.buy(sub, 5000).await;
    }
    let dead = eventually(Duration::from_secs(30), "two dead jobs", || async {
        let (_, dead) = api
            .admin(Method::GET, "/v1/dead-jobs?server=de-1", None)
            .await;
        (dead.as_array().map(Vec::len) == Some(2)).then_some(dead)
    })
    .await;
    assert!(dead[0]["error"].as_str().unwrap().contains("401"), "{dead}");
    assert_eq!(dead[0]["kind"], "create_key");
    let ids: Vec<u64> = dead
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_u64().unwrap())
        .collect();
    let (status, replayed) = api
        .admin(
            Method::POST,
            "/v1/dead-jobs/replay",
            Some(json!({"ids": [ids[0]]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(replayed["replayed"], json!([ids[0]]));
    let (status, discarded) = api
        .admin(
            Method::POST,
            "/v1/dead-jobs/discard",
            Some(json!({"all": true})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(discarded["discarded"], json!([ids[1]]));
    let (status, bad) = api
        .admin(
            Method::POST,
            "/v1/dead-jobs/discard",
            Some(json!({"all": true, "server": "de-1"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    wait_active(&env, 1).await;
    assert_eq!(fake.users().len(), 1, "the replayed create ran");

    fake.shutdown().await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_openapi_document_describes_every_route() {
    let env = TestEnv::new().await;
    let api = Api::start(&env, &[]);
    let doc: Value = api
        .http
        .get(format!("{}/v1/openapi.json", api.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
    for path in [
        "/v1/subscriptions/{id}/provision",
        "/v1/subscriptions/{id}/deprovision",
        "/v1/subscriptions/{id}",
        "/v1/servers",
        "/v1/servers/{name}",
        "/v1/servers/{name}/bump-config",
        "/v1/servers/{name}/pause",
        "/v1/servers/{name}/resume",
        "/v1/queue",
        "/v1/dead-jobs",
        "/v1/dead-jobs/replay",
        "/v1/dead-jobs/discard",
        "/v1/sweeps/{sweep}",
    ] {
        assert!(
            paths.iter().any(|p| *p == path),
            "{path} missing from {paths:?}"
        );
    }
    for (path, expect) in [
        ("/healthz", "ok"),
        ("/readyz", "postgres"),
        ("/metrics", "keyfleet_build_info"),
    ] {
        let response = api
            .http
            .get(format!("{}{path}", api.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert!(response.text().await.unwrap().contains(expect), "{path}");
    }
    env.cleanup().await;
}
