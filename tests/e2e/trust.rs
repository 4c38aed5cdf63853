//! "Postgres is the truth", tested as an operator would break it: Redis loses its data (with the
//! workers stopped and while they run), create, delete and reconcile of one key race (made
//! deterministic by holding a request inside the fake server until the test releases it), a server
//! refuses connections for longer than every job's retries, and Redis stays away for longer than
//! a lease while requests are in flight. Every assertion is on what the fake servers hold and
//! recorded, and on Postgres.

use std::{collections::BTreeMap, time::Duration};

use keyfleet::producer::Producer;
use keyfleet_core::{ServerId, SubscriptionId, subscription_of_owned_name};
use keyfleet_fakevpn::{Endpoint, FakeFleet, FakeServer, FakeServerConfig, Fault, Latency};
use keyfleet_queue::{Queue, QueueConfig};
use sqlx::Row;

use crate::{
    harness::{TcpProxy, TestEnv, chaos::PrivateRedis, eventually},
    support::{
        Worker, job_field, provision_many, redis_command, register, register_fleet, subscriptions,
    },
};

const PATIENCE: Duration = Duration::from_secs(120);

/// Knobs that keep retries and breaker cool-downs short, so a test waits seconds, not minutes.
const FAST: [(&str, &str); 4] = [
    ("KEYFLEET_RETRY_BASE_MS", "20"),
    ("KEYFLEET_RETRY_CAP_MS", "500"),
    ("KEYFLEET_BREAKER_COOLDOWN_MS", "200"),
    ("KEYFLEET_BREAKER_COOLDOWN_CAP_MS", "1000"),
];

fn sub(s: &str) -> SubscriptionId {
    SubscriptionId::parse(s).unwrap()
}

async fn fleet(v2ray: usize, outline: usize) -> FakeFleet {
    FakeFleet::start(v2ray, outline, |_, i| {
        FakeServerConfig::v2ray()
            .with_seed(i as u64 + 7)
            .with_latency(Latency::Fixed(Duration::from_millis(2)))
    })
    .await
    .unwrap()
}

#[derive(Debug)]
struct KeyRow {
    subscription: String,
    server: ServerId,
    state: String,
    server_key_id: Option<String>,
    link: Option<String>,
}

async fn key_rows(env: &TestEnv) -> Vec<KeyRow> {
    sqlx::query(
        "SELECT subscription_id, server_id, state, server_key_id, link FROM keys
         ORDER BY server_id, subscription_id",
    )
    .fetch_all(env.store.pool())
    .await
    .unwrap()
    .iter()
    .map(|r| KeyRow {
        subscription: r.get("subscription_id"),
        server: ServerId(r.get("server_id")),
        state: r.get("state"),
        server_key_id: r.get("server_key_id"),
        link: r.get("link"),
    })
    .collect()
}

/// Keys in a state that still needs work: nothing may stay there once the queue has drained.
async fn unsettled(env: &TestEnv) -> i64 {
    sqlx::query("SELECT count(*) FROM keys WHERE state IN ('pending', 'deleting', 'failed')")
        .fetch_one(env.store.pool())
        .await
        .unwrap()
        .get(0)
}

/// Waits until no key needs work and the queue is empty.
async fn settle(env: &TestEnv, what: &str) {
    eventually(PATIENCE, what, || async {
        let stats = env.queue.stats().await.ok()?;
        let idle = stats.ready + stats.running + stats.delayed == 0;
        (idle && unsettled(env).await == 0).then_some(())
    })
    .await;
}

/// keyfleet's users on a server, by subscription.
fn owned_users(fake: &FakeServer) -> BTreeMap<String, Vec<(String, String)>> {
    let mut users: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for u in fake.users() {
        if let Some(owner) = subscription_of_owned_name(&u.name) {
            users
                .entry(owner.as_str().to_owned())
                .or_default()
                .push((u.id, u.link));
        }
    }
    users
}

/// Postgres and the servers agree, key by key: an active row names the one user its server has
/// for the subscription (id and link), a deleted row has none, no row is left needing work, and no
/// server holds a keyfleet user that Postgres does not name as active. No duplicates anywhere.
async fn assert_postgres_is_the_truth(env: &TestEnv, servers: &[(ServerId, &FakeServer)]) {
    let rows = key_rows(env).await;
    for (id, fake) in servers {
        assert_eq!(fake.meter().duplicates, 0, "server {id}: duplicates stored");
        let mut users = owned_users(fake);
        for row in rows.iter().filter(|r| r.server == *id) {
            let on_server = users.remove(&row.subscription).unwrap_or_default();
            match row.state.as_str() {
                "active" => assert_eq!(
                    on_server,
                    vec![(
                        row.server_key_id.clone().unwrap(),
                        row.link.clone().unwrap()
                    )],
                    "{} on server {id}: Postgres holds the one key the server has",
                    row.subscription
                ),
                "deleted" => assert!(
                    on_server.is_empty(),
                    "{} on server {id}: deleted in Postgres but alive on the server: {on_server:?}",
                    row.subscription
                ),
                other => panic!(
                    "{} on server {id} is stuck in {other}: {row:?}",
                    row.subscription
                ),
            }
        }
        assert!(
            users.is_empty(),
            "server {id} holds keys Postgres has no active row for: {users:?}"
        );
    }
}

async fn stop(worker: Worker) {
    let (status, log) = worker.terminate(PATIENCE).await;
    assert!(status.success(), "SIGTERM exits 0: {status:?}\n{log}");
}

/// One fake V2Ray server registered as `name` (limit 4) and one worker: the setting of the race
/// tests.
struct OneServer {
    env: TestEnv,
    fleet: FakeFleet,
    id: ServerId,
    worker: Worker,
}

impl OneServer {
    async fn start(name: &str, worker_env: &[(&str, &str)]) -> Self {
        let env = TestEnv::new().await;
        let fleet = fleet(1, 0).await;
        let id = register(&env, name, &fleet.servers[0], 4).await;
        let worker = Worker::spawn(&env, 4, worker_env);
        Self {
            env,
            fleet,
            id,
            worker,
        }
    }

    fn fake(&self) -> &FakeServer {
        &self.fleet.servers[0]
    }

    fn producer(&self) -> Producer {
        Producer::new(self.env.store.clone(), self.env.queue.clone())
    }

    async fn key_state(&self, sub: &SubscriptionId) -> Option<String> {
        Some(self.env.store.key_row(sub, self.id).await.ok()??.state)
    }

    /// Checks Postgres against the server, then stops everything.
    async fn finish(self) {
        assert_postgres_is_the_truth(&self.env, &[(self.id, self.fake())]).await;
        stop(self.worker).await;
        self.fleet.shutdown().await;
        self.env.cleanup().await;
    }
}

/// Redis loses everything twice — once while no worker runs, once under a running worker — with
/// deprovisions, new purchases, a config bump and a node wipe around it: every row ends matching
/// the servers, nothing stuck, no duplicates. Before fence epochs, fences restarted at 1 after the
/// loss and the results of every row written before it were fenced out and dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_its_data_is_refilled_from_postgres_and_nothing_sticks() {
    let env = TestEnv::new().await;
    let fleet = fleet(3, 1).await;
    let ids = register_fleet(&env, "rl", &fleet, |_| 4).await;
    let servers: Vec<(ServerId, &FakeServer)> = ids.iter().copied().zip(&fleet.servers).collect();
    let first = subscriptions("rl", 50);
    provision_many(&env, &first).await;
    let worker = Worker::spawn(&env, 16, &FAST);
    settle(&env, "the first 50 purchases").await;
    stop(worker).await;

    // Redis restarts without persistence: keyfleet's state is gone.
    env.queue.purge().await.unwrap();
    let worker = Worker::spawn(&env, 16, &FAST);
    let producer = Producer::new(env.store.clone(), env.queue.clone());
    for s in &first[..10] {
        producer.deprovision(s).await.unwrap();
    }
    provision_many(&env, &subscriptions("rl-new", 10)).await;
    env.ok(&["server", "bump-config", "rl-0"]);
    env.ok(&["sweep", "configs"]);
    fleet.servers[1].wipe();
    env.ok(&["sweep", "reconcile", "--server", "rl-1"]);
    settle(
        &env,
        "deprovisions, purchases, a bump and a wipe after the loss",
    )
    .await;
    let stale: i64 = sqlx::query(
        "SELECT count(*) FROM keys k JOIN servers s ON s.id = k.server_id
         WHERE k.state = 'active' AND k.config_generation < s.config_generation",
    )
    .fetch_one(env.store.pool())
    .await
    .unwrap()
    .get(0);
    assert_eq!(
        stale, 0,
        "every link of the bumped server was re-fetched and stored"
    );
    assert_postgres_is_the_truth(&env, &servers).await;

    // Again while the worker runs, in the middle of a batch.
    let third = subscriptions("rl-hot", 30);
    let done_before = env.queue.stats().await.unwrap().done;
    provision_many(&env, &third).await;
    eventually(PATIENCE, "the batch under way", || async {
        (env.queue.stats().await.ok()?.done >= done_before + 30).then_some(())
    })
    .await;
    env.queue.purge().await.unwrap();
    for s in &third[..5] {
        producer.deprovision(s).await.unwrap();
    }
    settle(&env, "the batch after a loss under a running worker").await;
    assert_postgres_is_the_truth(&env, &servers).await;
    let log = worker.log();
    assert!(
        log.contains("re-derived outstanding work from Postgres"),
        "the worker noticed the loss:\n{log}"
    );
    stop(worker).await;
    fleet.shutdown().await;
    env.cleanup().await;
}

/// Reconcile reads Postgres (no row for the purchase yet), then its list request waits in the fake
/// while the purchase records its key and creates it; the list then shows the new key. Reconcile
/// must not delete it: its deletes come from a Postgres read after the list, and the delete itself
/// re-checks the intent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_racing_a_purchase_never_deletes_the_new_key() {
    let t = OneServer::start("rp-0", &FAST).await;
    let list = t.fake().hold(Endpoint::ListUsers);
    t.env.ok(&["sweep", "reconcile"]);
    list.wait_arrived(1).await;
    let buyer = sub("rp-buyer");
    t.producer().provision(&buyer, None).await.unwrap();
    eventually(PATIENCE, "the purchase's key active", || async {
        (t.key_state(&buyer).await? == "active").then_some(())
    })
    .await;
    list.release();
    settle(&t.env, "reconcile after the purchase").await;
    assert_eq!(
        t.fake().meter().requests.get(&Endpoint::DeleteUser),
        None,
        "nothing was deleted"
    );
    t.finish().await;
}

/// An expiry's delete gets a 503 and waits to retry; the user renews and the create adopts the
/// key that still exists; then the delete retries. It must re-check the intent and leave the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_delete_does_not_destroy_a_renewed_key() {
    // The first retry waits a minute (Retry-After): long enough that the test decides when it runs.
    let t = OneServer::start("dd-0", &[("KEYFLEET_RETRY_CAP_MS", "600000")]).await;
    let user = sub("dd-user");
    let producer = t.producer();
    producer.provision(&user, None).await.unwrap();
    settle(&t.env, "the purchase").await;
    t.fake().inject(
        Some(Endpoint::DeleteUser),
        Fault::TooManyRequests {
            retry_after_secs: 60,
        },
        1,
    );
    let delete = producer.deprovision(&user).await.unwrap().jobs[0].job;
    let delayed = t.env.queue.redis_key("delayed");
    eventually(PATIENCE, "the delete waiting to retry", || async {
        redis_command(&["ZSCORE", &delayed, &delete.to_string()])
            .into_text()
            .map(|_| ())
    })
    .await;
    producer.provision(&user, None).await.unwrap();
    eventually(PATIENCE, "the renewal active", || async {
        (t.key_state(&user).await? == "active").then_some(())
    })
    .await;
    let creates = t.fake().meter().creates_committed;
    // Now the delete's retry comes due.
    redis_command(&["ZADD", &delayed, "0", &delete.to_string()]);
    settle(&t.env, "the delete's retry").await;
    assert_eq!(
        t.fake().meter().deletes_committed,
        0,
        "the retried delete left the renewed key alone"
    );
    assert_eq!(
        t.fake().meter().creates_committed,
        creates,
        "the renewal adopted the key"
    );
    t.finish().await;
}

/// A create is at the server when the subscription is deprovisioned: the delete waits for the
/// create (one job per key at a time), then removes what it made. Without that order the delete
/// ran first, found nothing, and the create left an orphan key behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deprovision_while_a_create_runs_leaves_no_key_behind() {
    let t = OneServer::start("dc-0", &FAST).await;
    let create = t.fake().hold(Endpoint::CreateUser);
    let user = sub("dc-user");
    let producer = t.producer();
    producer.provision(&user, None).await.unwrap();
    create.wait_arrived(1).await;
    let receipt = producer.deprovision(&user).await.unwrap();
    assert_eq!(
        receipt.cancelled, 0,
        "the create is running, not cancellable"
    );
    // The delete either waits for the key's running create (parked in Redis) or, were jobs of one
    // key not ordered, runs now, finds nothing on the server and finishes.
    let delete = receipt.jobs[0].job;
    eventually(PATIENCE, "the delete parked, or done", || async {
        let state = job_field(&t.env, delete, "state");
        matches!(state.as_deref(), Some("waiting") | None).then_some(())
    })
    .await;
    create.release();
    settle(&t.env, "the create and the delete").await;
    assert!(
        t.fake().users().is_empty(),
        "no orphan: {:?}",
        t.fake().users()
    );
    assert_eq!(t.key_state(&user).await.as_deref(), Some("deleted"));
    t.finish().await;
}

/// A delete is at the server when the user buys again: the new create waits for the delete, then
/// makes a fresh key. Without that order it adopted the key the delete was about to remove, and
/// Postgres ended `active` with a dead link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_while_a_delete_runs_ends_with_one_live_key() {
    let t = OneServer::start("pd-0", &FAST).await;
    let user = sub("pd-user");
    let producer = t.producer();
    producer.provision(&user, None).await.unwrap();
    settle(&t.env, "the purchase").await;
    let delete = t.fake().hold(Endpoint::DeleteUser);
    producer.deprovision(&user).await.unwrap();
    delete.wait_arrived(1).await;
    let lists = || {
        t.fake()
            .meter()
            .requests
            .get(&Endpoint::ListUsers)
            .copied()
            .unwrap_or(0)
    };
    let lists_before = lists();
    let create = producer.provision(&user, None).await.unwrap().jobs[0].job;
    // The new create either waits for the key's running delete (parked in Redis) or, were jobs of
    // one key not ordered, runs now and looks the key up on the server to adopt it.
    eventually(PATIENCE, "the create parked, or acting", || async {
        let parked = job_field(&t.env, create, "state").as_deref() == Some("waiting");
        (parked || lists() > lists_before).then_some(())
    })
    .await;
    delete.release();
    settle(&t.env, "the delete and the new create").await;
    assert_eq!(t.fake().meter().deletes_committed, 1);
    assert_eq!(t.fake().users().len(), 1, "one live key");
    t.finish().await;
}

/// A server refuses connections with 200 creates queued for it, for longer than every create's
/// retries would last (8 attempts at these knobs burn out in seconds): the breaker keeps the jobs
/// waiting, probing with health requests only, so none is dead-lettered; once the server is back
/// every key becomes active. A key that had failed for a transient reason before is retried when
/// the breaker closes. The other server is not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_spends_no_job_attempts_and_heals_by_itself() {
    let env = TestEnv::new().await;
    let fleet = fleet(2, 0).await;
    let (down, up) = (&fleet.servers[0], &fleet.servers[1]);
    let down_id = register(&env, "out-down", down, 4).await;
    let up_id = register(&env, "out-up", up, 4).await;
    // A key of an earlier outage that failed for a transient reason.
    let earlier = sub("out-earlier");
    env.store
        .execute_admin(&format!(
            "INSERT INTO subscriptions (id) VALUES ('{earlier}');
             INSERT INTO keys (subscription_id, server_id, state, last_error, failed_transiently)
             VALUES ('{earlier}', {}, 'failed', 'gave up after 8 attempts: connection refused', true)",
            down_id.0
        ))
        .await
        .unwrap();
    down.set_refusing(true);
    let subs = subscriptions("out", 200);
    let receipts = provision_many(&env, &subs).await;
    let down_jobs: Vec<_> = receipts
        .iter()
        .flat_map(|r| r.jobs.iter().filter(|j| j.server == down_id).map(|j| j.job))
        .collect();
    let worker = Worker::spawn(&env, 16, &FAST);
    eventually(PATIENCE, "every key of the healthy server", || async {
        let rows = key_rows(&env).await;
        let active = rows
            .iter()
            .filter(|r| r.server == up_id && r.state == "active")
            .count();
        (active == 200).then_some(())
    })
    .await;
    // Long enough for many probes and for every create to have burnt its 8 attempts had each
    // probe been a job: wait for the breaker's cool-down to reach its cap a few times.
    eventually(PATIENCE, "a dozen failed health probes", || async {
        (worker.log().matches("Health probe failed").count() >= 12).then_some(())
    })
    .await;
    assert_eq!(
        env.queue.stats().await.unwrap().dead,
        0,
        "no job was dead-lettered"
    );
    // Only the failures that opened the breaker (the threshold, 5, plus what was in flight then,
    // at most the limit, 4) spent attempts; the probes spent none.
    let spent: u64 = down_jobs
        .iter()
        .map(|&job| job_field(&env, job, "attempts").map_or(0, |a| a.parse().unwrap()))
        .sum();
    assert!(
        spent <= 5 + 4,
        "{spent} attempts spent by the down server's jobs"
    );
    let requests_to_down = down.meter().total_requests;
    down.set_refusing(false);
    settle(&env, "the server's return").await;
    assert_eq!(env.queue.stats().await.unwrap().dead, 0);
    assert_eq!(
        down.users().len(),
        201,
        "every key on the server, the earlier failure too"
    );
    assert_postgres_is_the_truth(&env, &[(down_id, down), (up_id, up)]).await;
    eprintln!("outage: {requests_to_down} requests reached the refusing server's port");
    stop(worker).await;
    fleet.shutdown().await;
    env.cleanup().await;
}

/// Redis is out of reach of two workers for longer than the lease (1.5 s) while their creates are
/// in flight at each server's limit, each taking 6 s: the reaper (run here by the test, straight at
/// Redis, as any worker that still reached it would) takes the jobs back, and a third worker that
/// reaches Redis starts new attempts. The attempts whose lease could no longer be confirmed must
/// have stopped, aborting their requests, before the new ones start: the servers' own meters show
/// at most the limit at every instant, and nothing is lost or duplicated. (A Postgres outage is
/// `every_result_lands_after_ten_seconds_without_postgres`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_longer_than_the_lease_never_pushes_a_server_past_its_limit() {
    let env = TestEnv::new().await;
    let redis = PrivateRedis::start().await;
    let proxy = TcpProxy::start(([127, 0, 0, 1], redis.port).into()).await;
    let queue = Queue::connect(&redis.url(), QueueConfig::new(&env.prefix)).unwrap();
    queue
        .initialize(env.store.next_fence_epoch().await.unwrap())
        .await
        .unwrap();
    let fleet = FakeFleet::start(2, 0, |_, i| {
        FakeServerConfig::v2ray()
            .with_seed(i as u64)
            .with_latency(Latency::Fixed(Duration::from_millis(6000)))
    })
    .await
    .unwrap();
    let ids = register_fleet(&env, "lo", &fleet, |_| 2).await;
    let producer = Producer::new(env.store.clone(), queue.clone());
    for s in &subscriptions("lo", 2) {
        producer.provision(s, None).await.unwrap();
    }
    let through_proxy = format!("redis://127.0.0.1:{}", proxy.port);
    let knobs = [
        ("REDIS_URL", through_proxy.as_str()),
        ("KEYFLEET_LEASE_MS", "1500"),
        ("KEYFLEET_REQUEST_TIMEOUT_MS", "30000"),
        ("KEYFLEET_SHUTDOWN_GRACE_MS", "1000"),
        ("KEYFLEET_RETRY_BASE_MS", "20"),
        ("KEYFLEET_RETRY_CAP_MS", "500"),
    ];
    let w1 = Worker::spawn(&env, 2, &knobs);
    let w2 = Worker::spawn(&env, 2, &knobs);
    let in_flight = || {
        fleet
            .servers
            .iter()
            .map(|f| f.meter().in_flight)
            .collect::<Vec<_>>()
    };
    eventually(PATIENCE, "creates in flight at both servers", || async {
        (in_flight() == [2, 2]).then_some(())
    })
    .await;
    proxy.cut();
    let reaped = std::sync::atomic::AtomicU64::new(0);
    eventually(PATIENCE, "every lease expired and taken back", || async {
        let (n, _) = queue.reap_expired(100).await.ok()?;
        let total = reaped.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        (total == 4).then_some(())
    })
    .await;
    // Attempts that stop do so before their lease expires in Redis; ones that would go on are
    // still in flight for seconds. Wait a little for the former, never for the latter.
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while in_flight() != [0, 0] {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // A worker that reaches Redis takes the jobs over at once.
    let direct = redis.url();
    let mut direct_knobs = knobs.to_vec();
    direct_knobs[0] = ("REDIS_URL", direct.as_str());
    let w3 = Worker::spawn(&env, 4, &direct_knobs);
    eventually(PATIENCE, "the new attempts at the servers", || async {
        (queue.stats().await.ok()?.running == 4).then_some(())
    })
    .await;
    proxy.restore();
    eventually(PATIENCE, "every job done", || async {
        let stats = queue.stats().await.ok()?;
        (stats.done >= 4 && stats.ready + stats.running + stats.delayed == 0).then_some(())
    })
    .await;
    for (fake, id) in fleet.servers.iter().zip(&ids) {
        let m = fake.meter();
        assert!(
            m.peak_in_flight <= 2,
            "server {id}: peak in flight {} > its limit 2",
            m.peak_in_flight
        );
    }
    let servers: Vec<(ServerId, &FakeServer)> = ids.iter().copied().zip(&fleet.servers).collect();
    assert_postgres_is_the_truth(&env, &servers).await;
    for w in [w1, w2, w3] {
        stop(w).await;
    }
    drop(proxy);
    fleet.shutdown().await;
    queue.purge().await.unwrap();
    env.cleanup().await;
}

/// A server answers one link with a NUL byte in it: that key fails with a clear error, every
/// other key of the same batch commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_link_fails_its_key_only() {
    let env = TestEnv::new().await;
    let fleet = fleet(2, 0).await;
    let ids = register_fleet(&env, "nul", &fleet, |_| 8).await;
    fleet.servers[0].inject(Some(Endpoint::GetLink), Fault::NulInLink { offset: 5 }, 1);
    let subs = subscriptions("nul", 40);
    provision_many(&env, &subs).await;
    let worker = Worker::spawn(&env, 16, &FAST);
    eventually(PATIENCE, "79 keys active and one failed", || async {
        let rows = key_rows(&env).await;
        let active = rows.iter().filter(|r| r.state == "active").count();
        let failed = rows.iter().filter(|r| r.state == "failed").count();
        (active == 79 && failed == 1).then_some(())
    })
    .await;
    let failed: (String, Option<String>) =
        sqlx::query("SELECT subscription_id, last_error FROM keys WHERE state = 'failed'")
            .fetch_one(env.store.pool())
            .await
            .map(|r| (r.get(0), r.get(1)))
            .unwrap();
    let error = failed.1.unwrap_or_default();
    assert!(
        error.contains("NUL"),
        "the error says what was wrong: {error}"
    );
    assert!(!error.contains("vless://"), "and echoes no link: {error}");
    let dead = env.queue.dead_jobs(10).await.unwrap();
    assert_eq!(dead.len(), 1, "only that job failed: {dead:?}");
    assert_eq!(dead[0].server, ids[0]);
    stop(worker).await;
    fleet.shutdown().await;
    env.cleanup().await;
}

/// Redis comes back from an old snapshot: its epoch is there, but its fence counter is behind
/// what Postgres stored. A delete then carries a fence older than its key row's; it must not be
/// taken for a superseded attempt (and acknowledged without deleting): the fences are raised to a
/// new epoch and the job runs again, spending no attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restored_from_an_old_snapshot_is_caught_by_the_first_fenced_write() {
    let env = TestEnv::new().await;
    let fleet = fleet(2, 0).await;
    let ids = register_fleet(&env, "snap", &fleet, |_| 4).await;
    let servers: Vec<(ServerId, &FakeServer)> = ids.iter().copied().zip(&fleet.servers).collect();
    let subs = subscriptions("snap", 10);
    provision_many(&env, &subs).await;
    let worker = Worker::spawn(&env, 8, &FAST);
    settle(&env, "the purchases").await;
    // The restore: the counter goes back to where it was long ago.
    let fence_key = env.queue.redis_key("fence");
    redis_command(&["SET", &fence_key, "5"]);
    let producer = Producer::new(env.store.clone(), env.queue.clone());
    for s in &subs[..4] {
        producer.deprovision(s).await.unwrap();
    }
    settle(&env, "the deletes after the restore").await;
    assert_postgres_is_the_truth(&env, &servers).await;
    let deleted: i64 = sqlx::query("SELECT count(*) FROM keys WHERE state = 'deleted'")
        .fetch_one(env.store.pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(deleted, 8);
    assert!(
        worker.log().contains("Redis went backwards"),
        "{}",
        worker.log()
    );
    stop(worker).await;
    fleet.shutdown().await;
    env.cleanup().await;
}

/// Staging and production share a server. Each reconciles it and deprovisions a subscription id
/// they both have: neither adopts, deletes or counts the other's keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_sharing_a_server_never_touch_each_others_keys() {
    let production = TestEnv::new().await;
    let staging = TestEnv::new().await;
    let fake = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    let in_staging = [("KEYFLEET_KEY_NAMESPACE", "staging")];
    let prod_id = register(&production, "shared", &fake, 4).await;
    let stage_id = register(&staging, "shared", &fake, 4).await;
    let subs = subscriptions("both", 5);
    provision_many(&production, &subs).await;
    provision_many(&staging, &subs).await;
    let prod_worker = Worker::spawn(&production, 4, &FAST);
    let mut staging_knobs = FAST.to_vec();
    staging_knobs.extend(in_staging);
    let stage_worker = Worker::spawn(&staging, 4, &staging_knobs);
    settle(&production, "production's purchases").await;
    settle(&staging, "staging's purchases").await;
    assert_eq!(
        fake.users().len(),
        10,
        "one key per deployment and subscription"
    );
    let staging_names = fake
        .users()
        .into_iter()
        .filter(|u| u.name.starts_with("kf-staging."))
        .count();
    assert_eq!(staging_names, 5);

    production.ok(&["sweep", "reconcile"]);
    let out = staging
        .keyfleet()
        .env("KEYFLEET_KEY_NAMESPACE", "staging")
        .args(["sweep", "reconcile"])
        .output()
        .unwrap();
    assert!(out.status.success());
    Producer::new(production.store.clone(), production.queue.clone())
        .deprovision(&subs[0])
        .await
        .unwrap();
    settle(&production, "production's reconcile and delete").await;
    settle(&staging, "staging's reconcile").await;
    assert_eq!(
        fake.meter().deletes_committed,
        1,
        "only production's own key"
    );
    let names: Vec<String> = fake.users().into_iter().map(|u| u.name).collect();
    assert!(
        names.contains(&format!("kf-staging.{}", subs[0])),
        "{names:?}"
    );
    assert!(!names.contains(&format!("kf-{}", subs[0])), "{names:?}");
    for (env, id) in [(&staging, stage_id), (&production, prod_id)] {
        let rows = key_rows(env).await;
        assert!(
            rows.iter().all(|r| r.server == id),
            "one server row per deployment"
        );
        let users: BTreeMap<String, String> =
            fake.users().into_iter().map(|u| (u.id, u.name)).collect();
        for row in rows.iter().filter(|r| r.state == "active") {
            let name = &users[row.server_key_id.as_ref().unwrap()];
            let own = if std::ptr::eq(env, &staging) {
                format!("kf-staging.{}", row.subscription)
            } else {
                format!("kf-{}", row.subscription)
            };
            assert_eq!(name, &own, "each deployment holds its own key");
        }
    }
    stop(prod_worker).await;
    stop(stage_worker).await;
    fake.shutdown().await;
    production.cleanup().await;
    staging.cleanup().await;
}

/// The scheduler's tick claim commits with its sweep: while every sweep fails (Redis is
/// unreachable, so nothing can be enqueued), no tick is recorded as fired, and so each tick is
/// tried again rather than lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_that_fails_leaves_its_tick_to_be_tried_again() {
    let env = TestEnv::new().await;
    let fake = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    register(&env, "tick", &fake, 4).await;
    // Nothing listens on port 9 of loopback: every Redis call fails at once.
    let scheduler = crate::harness::sweeping::spawn_logged(
        &env,
        &[
            "scheduler",
            "--reconcile",
            "* * * * * *",
            "--expire",
            "off",
            "--configs",
            "off",
            "--traffic",
            "off",
        ],
        &[("REDIS_URL", "redis://127.0.0.1:9")],
    );
    eventually(PATIENCE, "three failed sweep ticks", || async {
        (scheduler.log().matches("Sweep tick failed").count() >= 3).then_some(())
    })
    .await;
    let ticks: i64 = sqlx::query("SELECT count(*) FROM sweep_ticks")
        .fetch_one(env.store.pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(ticks, 0, "a failed sweep's tick is not claimed");
    drop(scheduler);
    fake.shutdown().await;
    env.cleanup().await;
}

/// Issue 8's priority lane, end to end: a server at limit 1 has 300 config syncs queued (after a
/// config bump) when a customer buys. The purchase's create is the next request the server sees
/// after the one in flight: it never waits behind the sweep's work. Proven by the order of the
/// fake's request log, not by time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purchase_overtakes_a_config_sync_backlog_on_its_server() {
    let env = TestEnv::new().await;
    let fake = FakeServer::start(
        FakeServerConfig::v2ray().with_latency(Latency::Fixed(Duration::from_millis(5))),
    )
    .await
    .unwrap();
    let id = register(&env, "lane", &fake, 1).await;
    env.store
        .execute_admin(&format!(
            "INSERT INTO subscriptions (id) SELECT 'bulk-' || g FROM generate_series(1, 300) g;
             INSERT INTO keys (subscription_id, server_id, state, server_key_id, link,
                               config_synced_at, config_generation)
             SELECT 'bulk-' || g, {}, 'active', 'ghost-' || g, 'vless://ghost', now(), 1
             FROM generate_series(1, 300) g",
            id.0
        ))
        .await
        .unwrap();
    env.ok(&["server", "bump-config", "lane"]);
    let report: serde_json::Value =
        serde_json::from_str(&env.ok(&["sweep", "configs", "--json"])).unwrap();
    assert_eq!(report["enqueued"], 300);
    let worker = Worker::spawn(&env, 4, &FAST);
    let log_len = || fake.meter().log.len();
    eventually(PATIENCE, "the sync backlog under way", || async {
        (log_len() >= 20).then_some(())
    })
    .await;
    let buyer = sub("lane-buyer");
    Producer::new(env.store.clone(), env.queue.clone())
        .provision(&buyer, None)
        .await
        .unwrap();
    let seen_before = log_len();
    eventually(PATIENCE, "the purchase's key active", || async {
        let row = env.store.key_row(&buyer, id).await.ok()??;
        (row.state == "active").then_some(())
    })
    .await;
    let log = fake.meter().log;
    let create_at = log
        .iter()
        .position(|r| r.endpoint == Endpoint::CreateUser)
        .expect("the purchase's create reached the server");
    // At most the request in flight at the purchase (and one claimed just before it) came first.
    assert!(
        create_at <= seen_before + 1,
        "the create was request #{create_at}, {} requests after the purchase was queued",
        create_at - seen_before
    );
    let syncs_left = env.queue.stats().await.unwrap().ready;
    assert!(
        syncs_left > 100,
        "the backlog was still there: {syncs_left} ready"
    );
    stop(worker).await;
    fake.shutdown().await;
    env.cleanup().await;
}
