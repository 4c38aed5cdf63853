//! keyfleet on a real three-node Redis Cluster, reached through one seed node. The key prefix is
//! chosen so that the queue's slot lives on another node: every script, pipeline and command must
//! be routed there by the cluster client. A real worker serves purchases (wake-ups included), a
//! dead job is listed and replayed through the CLI, and the purge leaves the cluster empty.

use std::time::Duration;

use keyfleet_core::SubscriptionId;
use keyfleet_fakevpn::{Endpoint, FakeFleet, FakeServerConfig, Fault};
use keyfleet_queue::RedisMode;

use crate::{
    harness::{
        TestEnv,
        chaos::{RedisCluster, dlq_list},
        eventually, new_prefix,
        sweeping::spawn_worker,
    },
    support::{register_fleet, wait_for_active},
};

const WITHIN: Duration = Duration::from_secs(30);

#[tokio::test]
async fn purchases_dead_jobs_and_purge_work_on_a_three_node_cluster() {
    let cluster = RedisCluster::start(3).await;
    let seed = cluster.ports[0];
    // A prefix whose slot the seed node does not serve (it answers MOVED).
    let prefix = std::iter::repeat_with(new_prefix)
        .find(|p| {
            cluster
                .cli(seed, &["EXISTS", &format!("{{{p}}}:epoch")])
                .contains("MOVED")
        })
        .unwrap();
    let env = TestEnv::on_redis(&cluster.seed_url(), RedisMode::Cluster, prefix).await;
    let owner = *cluster
        .ports
        .iter()
        .find(|&&port| cluster.cli(port, &["EXISTS", &env.queue.redis_key("epoch")]) == "1\n")
        .expect("a node holds the queue's epoch");
    assert_ne!(owner, seed);

    let fleet = FakeFleet::start(2, 1, |_, i| FakeServerConfig::v2ray().with_seed(i as u64))
        .await
        .unwrap();
    register_fleet(&env, "cl", &fleet, |_| 4).await;
    // The first create on the first server is refused for good: a dead job.
    fleet.servers[0].inject(Some(Endpoint::CreateUser), Fault::Status(401), 1);
    let mut worker = spawn_worker(&env, 8, &[]);
    for n in 0..5 {
        env.ok(&["provision", "--subscription", &format!("c{n}")]);
    }
    wait_for_active(&env, 14, WITHIN).await;
    let dead = eventually(WITHIN, "the refused create in the dead set", || async {
        let dead = dlq_list(&env);
        (dead.len() == 1).then_some(dead)
    })
    .await;
    assert!(dead[0].to_string().contains("401"), "{dead:?}");
    env.ok(&["dlq", "replay", "--all"]);
    wait_for_active(&env, 15, WITHIN).await;

    for fake in &fleet.servers {
        let meter = fake.meter();
        assert_eq!(meter.creates_committed, 5, "{meter:?}");
        assert_eq!(meter.duplicates, 0);
    }
    let stats = env.queue.server_stats().await.unwrap();
    assert_eq!(stats.len(), 3, "{stats:?}");
    for s in &stats {
        assert_eq!(
            (s.ready, s.delayed, s.running, s.dead),
            (0, 0, 0, 0),
            "{s:?}"
        );
    }
    let producer_sub = SubscriptionId::parse("c0").unwrap();
    assert_eq!(
        env.store
            .subscription_keys(&producer_sub)
            .await
            .unwrap()
            .keys
            .len(),
        3
    );
    let log = worker.log();
    assert!(
        !log.contains("wake subscription") && !log.contains("subscribe to Redis wake-ups"),
        "the worker lost its wake-up subscription:\n{log}"
    );
    assert!(worker.terminate(WITHIN).success());

    env.queue.purge().await.unwrap();
    for port in &cluster.ports {
        assert_eq!(cluster.cli(*port, &["DBSIZE"]), "0\n", "node {port}");
    }
    env.cleanup().await;
}
