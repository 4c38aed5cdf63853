//! One subscription provisioned end to end through the real worker binary.

use std::time::Duration;

use keyfleet_fakevpn::{FakeFleet, FakeServerConfig, ServerKind};
use nix::sys::signal::Signal;

use crate::harness::{TestEnv, eventually};

#[tokio::test]
async fn a_subscription_gets_one_key_per_server_with_its_link() {
    let env = TestEnv::new().await;
    let fleet = FakeFleet::start(2, 1, |kind, _| match kind {
        ServerKind::V2ray => FakeServerConfig::v2ray(),
        ServerKind::Outline | ServerKind::XrayGrpc => FakeServerConfig::outline(),
    })
    .await
    .unwrap();
    for (i, fake) in fleet.servers.iter().enumerate() {
        env.add_server(&format!("srv-{i}"), fake, 2);
    }
    let receipt: serde_json::Value =
        serde_json::from_str(&env.ok(&["provision", "--subscription", "Sub-1", "--json"])).unwrap();
    assert_eq!(receipt["jobs"].as_array().unwrap().len(), 3);
    // The same purchase again while its jobs are pending: the same three jobs, nothing new.
    let again: serde_json::Value =
        serde_json::from_str(&env.ok(&["provision", "--subscription", "sub-1", "--json"])).unwrap();
    assert!(
        again["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["new"] == false),
        "{again}"
    );
    let ids = |r: &serde_json::Value| {
        r["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["job"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&receipt),
        ids(&again),
        "the second call returns the existing jobs"
    );

    let worker = env.spawn_worker(4, &[]);
    let status = eventually(Duration::from_secs(30), "all keys active", || async {
        let out = env.run(&["status", "--subscription", "sub-1", "--json"]);
        let keys: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        keys.as_array()?
            .iter()
            .all(|k| k["state"] == "active")
            .then_some(keys)
    })
    .await;
    let (exit, log) = worker.terminate(Duration::from_secs(20));
    assert!(exit.success(), "SIGTERM exits 0: {exit:?}\n{log}");

    for (key, fake) in status.as_array().unwrap().iter().zip(&fleet.servers) {
        let users = fake.users();
        assert_eq!(users.len(), 1, "exactly one key on {}", fake.api_url());
        assert_eq!(
            key["server_key_id"],
            users[0].id.as_str(),
            "Postgres holds the server's id"
        );
        assert_eq!(key["link_present"], true);
        assert!(key["config_synced_at"].is_string());
        assert!(key["last_error"].is_null());
        let meter = fake.meter();
        assert_eq!((meter.creates_committed, meter.duplicates), (1, 0));
    }
    let links: Vec<(String, String)> = sqlx_links(&env).await;
    for (fake, (id, link)) in fleet.servers.iter().zip(&links) {
        let user = fake.users().into_iter().find(|u| &u.id == id).unwrap();
        assert_eq!(&user.link, link, "the stored link is the server's link");
    }
    let stats = env.queue.stats().await.unwrap();
    assert_eq!(
        (
            stats.ready,
            stats.running,
            stats.delayed,
            stats.dead,
            stats.done
        ),
        (0, 0, 0, 0, 3)
    );
    fleet.shutdown().await;
    env.cleanup().await;
}

async fn sqlx_links(env: &TestEnv) -> Vec<(String, String)> {
    let sub = "sub-1".parse().unwrap();
    let mut out = vec![];
    for status in env.store.subscription_status(&sub).await.unwrap() {
        let link = env
            .store
            .key_link(&sub, status.server_id)
            .await
            .unwrap()
            .unwrap();
        out.push((status.server_key_id.unwrap(), link));
    }
    out
}

#[tokio::test]
async fn a_permanent_error_marks_the_key_failed_with_its_reason() {
    let env = TestEnv::new().await;
    let fake = keyfleet_fakevpn::FakeServer::start(FakeServerConfig::v2ray())
        .await
        .unwrap();
    // Registered with the wrong API key: the panel answers 401, which no retry can fix.
    let url = fake.api_url();
    env.ok(&[
        "server",
        "add",
        "--name",
        "wrong-key",
        "--kind",
        "v2ray",
        "--api-url",
        &url,
        "--api-key",
        "nope",
    ]);
    env.ok(&["provision", "--subscription", "s2"]);
    let worker = env.spawn_worker(2, &[]);
    let key = eventually(Duration::from_secs(30), "the key to fail", || async {
        let keys = env
            .store
            .subscription_status(&"s2".parse().unwrap())
            .await
            .ok()?;
        keys.into_iter().find(|k| k.state == "failed")
    })
    .await;
    assert!(
        key.last_error.as_deref().unwrap().contains("401")
            || key
                .last_error
                .as_deref()
                .unwrap()
                .to_lowercase()
                .contains("api key"),
        "{key:?}"
    );
    assert_eq!(
        fake.meter().total_requests,
        1,
        "dead-lettered on the first attempt"
    );
    assert_eq!(env.queue.stats().await.unwrap().dead, 1);
    worker.signal(Signal::SIGKILL);
    env.cleanup().await;
}
