//! The `xray-grpc` kind against a real V2Ray node (Debian's `v2ray`, installed by `.ci/run`): a
//! `v2ray` process on loopback with an API inbound (HandlerService, StatsService) and a VLESS
//! inbound, both on free ports. Provisioning goes through a real worker process; what the node
//! holds is checked by asking the node itself. No mock of the node. The fake node of
//! `keyfleet-fakevpn` covers what a real one cannot be made to do: lost answers, holds.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use keyfleet::producer::Producer;
use keyfleet_core::{ServerId, SubscriptionId, owned_v2ray_email};
use keyfleet_fakevpn::{Endpoint, FakeGrpcNode, GrpcFault};
use keyfleet_vpn::{
    AccountKind, ClientConfig, DeleteOutcome, GrpcApi, GrpcSettings, LinkParams, LinkSecurity,
    ServerEndpoint, VpnClient, XrayClient,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    harness::{TestEnv, chaos::free_port, eventually, sweeping::spawn_worker},
    support::{provision_many, subscriptions, wait_for_active},
};

const INBOUND: &str = "vless-in";

/// A `v2ray` process of this test. Dropping it kills it.
struct V2rayNode {
    child: Option<Child>,
    config: PathBuf,
    api_port: u16,
    vless_port: u16,
}

/// The `v2ray` binary; a clear failure (not a skip) when it is missing: `.ci/run` installs it.
fn v2ray_binary() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("v2ray"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "the v2ray binary is not on PATH: these tests run a real V2Ray node. \
             Install Debian's package (`apt-get install v2ray`; .ci/run does this)."
        )
    })
}

impl V2rayNode {
    async fn start() -> Self {
        let api_port = free_port();
        let vless_port = free_port();
        let dir = std::env::temp_dir().join("keyfleet-e2e");
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join(format!("v2ray-{}.json", uuid::Uuid::new_v4().simple()));
        let json = serde_json::json!({
            "log": {"loglevel": "warning"},
            "api": {"tag": "api", "services": ["HandlerService", "StatsService"]},
            "stats": {},
            "policy": {"levels": {"0": {"statsUserUplink": true, "statsUserDownlink": true}}},
            "inbounds": [
                {"tag": "api", "listen": "127.0.0.1", "port": api_port,
                 "protocol": "dokodemo-door", "settings": {"address": "127.0.0.1"}},
                {"tag": INBOUND, "listen": "127.0.0.1", "port": vless_port,
                 "protocol": "vless", "settings": {"clients": [], "decryption": "none"}},
                {"tag": "vmess-in", "listen": "127.0.0.1", "port": free_port(),
                 "protocol": "vmess", "settings": {"clients": []}}
            ],
            "outbounds": [{"tag": "direct", "protocol": "freedom"}],
            "routing": {"rules": [{"type": "field", "inboundTag": ["api"], "outboundTag": "api"}]}
        });
        std::fs::write(&config, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
        let mut node = Self {
            child: None,
            config,
            api_port,
            vless_port,
        };
        node.spawn().await;
        node
    }

    async fn spawn(&mut self) {
        let child = Command::new(v2ray_binary())
            .arg("-config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("v2ray starts");
        self.child = Some(child);
        let probe = std::net::SocketAddr::from(([127, 0, 0, 1], self.api_port));
        eventually(
            Duration::from_secs(20),
            "the v2ray API port to listen",
            || async { tokio::net::TcpStream::connect(probe).await.ok().map(drop) },
        )
        .await;
    }

    /// Kills the node and starts it again on the same ports: it forgets every user added over
    /// the API, and its traffic counters start at zero.
    async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }
}

impl Drop for V2rayNode {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.config);
    }
}

/// The node's client, built from the server's row as a worker builds it.
async fn node_client(env: &TestEnv, name: &str) -> (ServerId, XrayClient) {
    let server = env.store.server_by_name(name).await.unwrap();
    let endpoint = keyfleet::servers::endpoint_of(&server).unwrap();
    match VpnClient::new(&endpoint, &ClientConfig::default()).unwrap() {
        VpnClient::XrayGrpc(c) => (server.id, c),
        other => panic!("expected an xray-grpc client, got {other:?}"),
    }
}

/// Whether the node has the subscription's user: adding it again must answer "already exists"
/// (adopted). Adds it if it was not there, so only for users that should exist.
async fn node_has_user(node: &XrayClient, sub: &SubscriptionId) -> bool {
    node.ensure_key(sub).await.unwrap().adopted
}

/// A TCP echo server on loopback; returns its port.
async fn echo_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = socket.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

/// Sends `bytes` through the node's VLESS inbound as the user of `link` (its uuid, address and
/// port) to the echo server, and reads them back: real user traffic the node counts.
async fn vless_round_trip(link: &str, echo_port: u16, bytes: usize) {
    let url = url::Url::parse(link).unwrap();
    let uuid = uuid::Uuid::parse_str(url.username()).unwrap();
    let addr = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    // VLESS request: version 0, uuid, no addons, command 1 (TCP), port, address type 1 (IPv4).
    let mut header = vec![0u8];
    header.extend_from_slice(uuid.as_bytes());
    header.extend_from_slice(&[0, 1]);
    header.extend_from_slice(&echo_port.to_be_bytes());
    header.extend_from_slice(&[1, 127, 0, 0, 1]);
    let payload = vec![b'k'; bytes];
    header.extend_from_slice(&payload);
    stream.write_all(&header).await.unwrap();
    // Response: version 0, addons length, then the echoed bytes.
    let mut response = vec![0u8; 2 + bytes];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut response))
        .await
        .expect("the echo comes back through the node")
        .unwrap();
    assert_eq!(&response[..2], &[0, 0]);
    assert_eq!(&response[2..], &payload[..]);
}

async fn traffic_of(env: &TestEnv, sub: &SubscriptionId, server: ServerId) -> i64 {
    env.store.key_traffic(sub, server).await.unwrap().unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_v2ray_node_is_provisioned_restored_after_a_restart_and_metered() {
    let mut node = V2rayNode::start().await;
    let env = TestEnv::new().await;
    let vless_port = node.vless_port.to_string();
    let api_url = node.api_url();
    let base = [
        "server",
        "add",
        "--name",
        "node-1",
        "--kind",
        "xray-grpc",
        "--api-url",
        &api_url,
    ];
    for (extra, flag) in [
        (
            &["--link-address", "127.0.0.1", "--link-port", "1"][..],
            "--inbound-tag",
        ),
        (
            &["--inbound-tag", INBOUND, "--link-port", "1"][..],
            "--link-address",
        ),
        (
            &[
                "--inbound-tag",
                INBOUND,
                "--link-address",
                "127.0.0.1",
                "--link-port",
                "1",
                "--link-security",
                "reality",
            ][..],
            "--link-public-key",
        ),
    ] {
        let out = env.run(&[&base[..], extra].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(flag),
            "{flag}: {stderr}"
        );
    }
    env.ok(&[
        "server",
        "add",
        "--name",
        "node-1",
        "--kind",
        "xray-grpc",
        "--api-url",
        &node.api_url(),
        "--inbound-tag",
        INBOUND,
        "--link-address",
        "127.0.0.1",
        "--link-port",
        &vless_port,
        "--max-in-flight",
        "4",
    ]);
    let (server, client) = node_client(&env, "node-1").await;
    let mut worker = spawn_worker(&env, 8, &[]);

    // Provision 50 subscriptions through the worker.
    let subs = subscriptions("grpc", 50);
    provision_many(&env, &subs).await;
    wait_for_active(&env, 50, Duration::from_secs(60)).await;
    for sub in &subs {
        let row = env.store.key_row(sub, server).await.unwrap().unwrap();
        assert_eq!(row.state, "active");
        assert_eq!(
            row.server_key_id.as_deref(),
            Some(owned_v2ray_email(sub).as_str())
        );
        let link = row.link.expect("the link is stored");
        let expected = format!(
            "vless://{}@127.0.0.1:{}?encryption=none&security=none&type=tcp#node-1",
            client.user_uuid(sub),
            node.vless_port
        );
        assert_eq!(link, expected);
        assert!(node_has_user(&client, sub).await, "{sub} is on the node");
    }

    // Real traffic through the node, collected into Postgres.
    let echo = echo_server().await;
    let metered = &subs[0];
    let link = env.store.key_link(metered, server).await.unwrap().unwrap();
    vless_round_trip(&link, echo, 20_000).await;
    env.ok(&["sweep", "traffic"]);
    let before_restart = eventually(Duration::from_secs(20), "traffic collected", || async {
        let bytes = traffic_of(&env, metered, server).await;
        (bytes >= 40_000).then_some(bytes)
    })
    .await;

    // The first reconcile plants the marker user (and finds every user there); the second sees
    // the node kept its users.
    env.ok(&["sweep", "reconcile"]);
    eventually(Duration::from_secs(20), "the first reconcile", || async {
        worker
            .log()
            .contains("adding every wanted user again")
            .then_some(())
    })
    .await;
    env.ok(&["sweep", "reconcile"]);
    eventually(Duration::from_secs(20), "the second reconcile", || async {
        worker
            .log()
            .contains("the node kept its users")
            .then_some(())
    })
    .await;

    // A restart forgets every user added over the API: reconcile notices and restores them all.
    // Uptime counts whole seconds: a node restarted well after its start is told apart by it.
    eventually(Duration::from_secs(20), "the node to run 5 s", || async {
        (client.uptime().await.unwrap() >= Duration::from_secs(5)).then_some(())
    })
    .await;
    node.restart().await;
    let email = owned_v2ray_email(&subs[1]);
    assert_eq!(
        client.delete_user(&email).await.unwrap(),
        DeleteOutcome::AlreadyGone,
        "the restarted node forgot its users"
    );
    let restarted_at = chrono::Utc::now();
    env.ok(&["sweep", "reconcile"]);
    eventually(
        Duration::from_secs(60),
        "every user added again",
        || async {
            for sub in &subs {
                let row = env.store.key_row(sub, server).await.unwrap().unwrap();
                if row.state != "active" || row.updated_at < restarted_at {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    let restores = worker
        .log()
        .matches("adding every wanted user again")
        .count();
    assert_eq!(
        restores, 2,
        "the first reconcile and the one after the restart"
    );
    for sub in &subs {
        assert!(
            node_has_user(&client, sub).await,
            "{sub} is back on the node"
        );
    }

    // Counters restarted at zero: the next reading is all new traffic, even though it is above
    // the last reading before the restart (which plain cumulative counting takes for growth).
    vless_round_trip(&link, echo, 30_000).await;
    env.ok(&["sweep", "traffic"]);
    eventually(
        Duration::from_secs(20),
        "traffic after the restart",
        || async {
            let bytes = traffic_of(&env, metered, server).await;
            (bytes >= before_restart + 60_000).then_some(())
        },
    )
    .await;

    // Deprovision removes every user from the node.
    let producer = Producer::new(env.store.clone(), env.queue.clone());
    for sub in &subs {
        producer.deprovision(sub).await.unwrap();
    }
    eventually(Duration::from_secs(60), "every key deleted", || async {
        (env.store.count_keys_in_state("deleted").await.unwrap() == 50).then_some(())
    })
    .await;
    for sub in &subs {
        assert_eq!(
            client.delete_user(&owned_v2ray_email(sub)).await.unwrap(),
            DeleteOutcome::AlreadyGone,
            "{sub} was removed from the node"
        );
    }
    assert!(worker.terminate(Duration::from_secs(20)).success());
    env.cleanup().await;
}

/// A client of `node` for the inbound `tag`, built directly (no server row).
fn direct_client(
    node: &V2rayNode,
    tag: &str,
    protocol: AccountKind,
    api: Option<GrpcApi>,
) -> XrayClient {
    let endpoint = ServerEndpoint {
        name: "direct".into(),
        kind: keyfleet_core::ServerKind::XrayGrpc,
        api_url: url::Url::parse(&node.api_url()).unwrap(),
        api_key: None,
        cert_sha256: None,
        grpc: Some(GrpcSettings {
            inbound_tag: tag.into(),
            api,
            protocol,
            link: LinkParams {
                address: "127.0.0.1".into(),
                port: 443,
                security: LinkSecurity::Tls,
                network: "ws".into(),
                sni: None,
                fingerprint: None,
                alpn: None,
                public_key: None,
                short_id: None,
                spider_x: None,
                flow: None,
                path: Some("/ws".into()),
                host: None,
                service_name: None,
                remark: None,
            },
        }),
        key_secret: Some("test-secret".into()),
    };
    match VpnClient::new(&endpoint, &ClientConfig::default()).unwrap() {
        VpnClient::XrayGrpc(c) => c,
        other => panic!("expected an xray-grpc client, got {other:?}"),
    }
}

#[tokio::test]
async fn vmess_users_and_the_duplicate_and_missing_answers_of_a_real_node() {
    let node = V2rayNode::start().await;
    let sub = SubscriptionId::parse("vm-1").unwrap();
    let email = owned_v2ray_email(&sub);
    let vmess = direct_client(&node, "vmess-in", AccountKind::Vmess, Some(GrpcApi::V2ray));
    let first = vmess.ensure_key(&sub).await.unwrap();
    assert!(!first.adopted && first.link.starts_with("vmess://"));
    let again = vmess.ensure_key(&sub).await.unwrap();
    assert!(
        again.adopted,
        "a second add meets \"already exists\" and adopts"
    );
    assert_eq!(again.link, first.link, "the same uuid, so the same link");
    assert_eq!(
        vmess.delete_user(&email).await.unwrap(),
        DeleteOutcome::Deleted
    );
    assert_eq!(
        vmess.delete_user(&email).await.unwrap(),
        DeleteOutcome::AlreadyGone
    );

    // An unknown inbound is an error, never "the user is not there": a remove on a wrong tag
    // must not count as done.
    let wrong = direct_client(&node, "no-such-inbound", AccountKind::Vless, None);
    let err = wrong.delete_user(&email).await.unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    assert!(err.to_string().contains("AlterInbound"), "{err}");
    let err = wrong.ensure_key(&sub).await.unwrap_err();
    assert!(!err.is_retryable(), "{err}");

    // The Xray-core package on a V2Ray node: refused as unimplemented, permanently.
    let xray = direct_client(&node, "vmess-in", AccountKind::Vmess, Some(GrpcApi::Xray));
    let err = xray.health().await.unwrap_err();
    assert!(
        err.to_string().contains("Unimplemented") && !err.is_retryable(),
        "{err}"
    );
}

/// `server add` of a fake node (Xray-core package, no detection) with this limit.
async fn add_fake_node(env: &TestEnv, name: &str, node: &FakeGrpcNode, limit: u32) -> ServerId {
    let limit = limit.to_string();
    env.ok(&[
        "server",
        "add",
        "--name",
        name,
        "--kind",
        "xray-grpc",
        "--grpc-api",
        "xray",
        "--api-url",
        &node.api_url(),
        "--inbound-tag",
        node.inbound_tag(),
        "--link-address",
        "vpn.example.net",
        "--link-port",
        "443",
        "--link-security",
        "reality",
        "--link-sni",
        "www.example.com",
        "--link-public-key",
        "SbVKOEMjK0sIlbwg4akyBg5mL5KZwwB-ed4eEE7YnRc",
        "--link-flow",
        "xtls-rprx-vision",
        "--max-in-flight",
        &limit,
    ]);
    env.store.server_by_name(name).await.unwrap().id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answers_retry_into_one_user_each_within_the_limit_and_a_restart_is_repaired() {
    let node = FakeGrpcNode::start("vless-in").await.unwrap();
    let env = TestEnv::new().await;
    let server = add_fake_node(&env, "fake-node", &node, 2).await;
    for _ in 0..3 {
        node.inject(Endpoint::AddUser, GrpcFault::LostAfterCommit);
    }
    node.inject(Endpoint::AddUser, GrpcFault::Unavailable);
    let mut worker = spawn_worker(&env, 8, &[("KEYFLEET_RETRY_BASE_MS", "10")]);

    let subs = subscriptions("fk", 20);
    provision_many(&env, &subs).await;
    wait_for_active(&env, 20, Duration::from_secs(60)).await;
    let users = node.users();
    let meter = node.meter();
    assert_eq!(users.len(), 20, "one user per subscription: {users:?}");
    assert!(
        meter.conflicts >= 3,
        "the retries of lost answers adopted: {meter:?}"
    );
    assert!(
        meter.peak_in_flight <= 2,
        "the server's limit held: {}",
        meter.peak_in_flight
    );
    let row = env.store.key_row(&subs[0], server).await.unwrap().unwrap();
    let link = row.link.unwrap();
    let uuid = &users[&owned_v2ray_email(&subs[0])];
    assert!(
        link.starts_with(&format!("vless://{uuid}@vpn.example.net:443?"))
            && link.contains("security=reality"),
        "{link}"
    );

    // Traffic, a restart (users, counters and uptime gone), reconcile, more traffic than before.
    let email = owned_v2ray_email(&subs[0]);
    node.add_traffic(&email, 100, 50);
    env.ok(&["sweep", "traffic"]);
    eventually(Duration::from_secs(20), "traffic collected", || async {
        (traffic_of(&env, &subs[0], server).await == 150).then_some(())
    })
    .await;
    node.restart();
    env.ok(&["sweep", "reconcile"]);
    eventually(Duration::from_secs(30), "every user back", || async {
        (node.users().len() == 21).then_some(())
    })
    .await;
    let users = node.users();
    for sub in &subs {
        assert!(users.contains_key(&owned_v2ray_email(sub)), "{sub} is back");
    }
    assert!(users.keys().any(|e| e.contains("~marker")), "{users:?}");
    node.add_traffic(&email, 500, 0);
    env.ok(&["sweep", "traffic"]);
    eventually(
        Duration::from_secs(20),
        "traffic after the restart",
        || async { (traffic_of(&env, &subs[0], server).await == 650).then_some(()) },
    )
    .await;
    assert!(node.meter().peak_in_flight <= 2);
    assert!(worker.terminate(Duration::from_secs(20)).success());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deprovision_during_a_parked_add_leaves_no_user() {
    let node = FakeGrpcNode::start("vless-in").await.unwrap();
    let env = TestEnv::new().await;
    add_fake_node(&env, "fake-node", &node, 4).await;
    let hold = node.hold(Endpoint::AddUser);
    let mut worker = spawn_worker(&env, 4, &[]);
    let sub = SubscriptionId::parse("parked").unwrap();
    provision_many(&env, std::slice::from_ref(&sub)).await;
    hold.wait_arrived(1).await;
    let producer = Producer::new(env.store.clone(), env.queue.clone());
    producer.deprovision(&sub).await.unwrap();
    hold.release();
    eventually(Duration::from_secs(30), "the key deleted", || async {
        (env.store.count_keys_in_state("deleted").await.unwrap() == 1).then_some(())
    })
    .await;
    assert!(node.users().is_empty(), "{:?}", node.users());
    let meter = node.meter();
    assert_eq!((meter.creates_committed, meter.deletes_committed), (1, 1));
    assert!(worker.terminate(Duration::from_secs(20)).success());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lists_its_users_is_reconciled_by_diff() {
    let node = FakeGrpcNode::start_listing("vless-in").await.unwrap();
    let env = TestEnv::new().await;
    add_fake_node(&env, "listing-node", &node, 4).await;
    let mut worker = spawn_worker(&env, 4, &[]);
    let subs = subscriptions("ls", 5);
    provision_many(&env, &subs).await;
    wait_for_active(&env, 5, Duration::from_secs(30)).await;

    // Drift both ways: one user lost, one keyfleet-named user nobody wants, one made by hand.
    assert!(node.remove_user(&owned_v2ray_email(&subs[0])));
    let unwanted = owned_v2ray_email(&SubscriptionId::parse("gone").unwrap());
    node.add_user(&unwanted, &uuid::Uuid::new_v4().to_string());
    node.add_user("alice@example.com", &uuid::Uuid::new_v4().to_string());
    env.ok(&["sweep", "reconcile"]);
    eventually(Duration::from_secs(30), "the drift repaired", || async {
        let users = node.users();
        (users.contains_key(&owned_v2ray_email(&subs[0])) && !users.contains_key(&unwanted))
            .then_some(())
    })
    .await;
    let users = node.users();
    assert_eq!(users.len(), 6, "five subscriptions and alice: {users:?}");
    assert!(
        users.contains_key("alice@example.com"),
        "users not keyfleet's stay"
    );
    assert!(
        !users.keys().any(|e| e.contains("~marker")),
        "a listing node needs no marker: {users:?}"
    );
    assert_eq!(node.meter().requests[&Endpoint::ListUsers], 1);
    assert!(worker.terminate(Duration::from_secs(20)).success());
    env.cleanup().await;
}
