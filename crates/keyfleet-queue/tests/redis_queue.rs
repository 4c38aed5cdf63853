//! The queue's scripts against a real Redis (REDIS_URL, default 127.0.0.1:6379), one key prefix
//! per test, checked empty afterwards.

use std::time::Duration;

use keyfleet_core::{JobKind, JobPayload, ServerId, SubscriptionId};
use keyfleet_queue::{
    Breaker, BreakerEvent, Claim, ClaimedJob, Enqueued, FENCE_EPOCH_SHIFT, Finish, FinishResult,
    JobId, Lane, ProbeOutcome, Queue, QueueConfig, ReplayOutcome, ServerQueueStats,
};

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn config() -> QueueConfig {
    QueueConfig::new(format!("kftest:{}", uuid::Uuid::new_v4().simple()))
}

/// A queue under a fresh prefix, initialised at fence epoch 1.
async fn connect(config: QueueConfig) -> Queue {
    let q = Queue::connect(&redis_url(), config).unwrap();
    assert!(
        q.initialize(1).await.unwrap(),
        "a new prefix starts uninitialised"
    );
    q
}

async fn queue(lease: Duration) -> Queue {
    let mut config = config();
    config.lease = lease;
    connect(config).await
}

async fn finish(q: &Queue, job: &ClaimedJob, how: &Finish) -> FinishResult {
    q.finish(job, how).await.unwrap().0
}

fn create(server: i64, sub: &str) -> JobPayload {
    JobPayload::create(ServerId(server), SubscriptionId::parse(sub).unwrap())
}

async fn claim(q: &Queue) -> Option<ClaimedJob> {
    match q.claim("test-worker").await.unwrap() {
        Claim::Job(job) => Some(job),
        Claim::Empty { .. } => None,
        other => panic!("expected a job or nothing, got {other:?}"),
    }
}

async fn cleanup(q: Queue) {
    q.purge().await.unwrap();
    assert_eq!(q.purge().await.unwrap(), 0, "prefix left keys behind");
}

#[tokio::test]
async fn same_operation_enqueued_twice_is_one_job() {
    let q = queue(Duration::from_secs(10)).await;
    let first = q.enqueue(&create(1, "a")).await.unwrap();
    let second = q.enqueue(&create(1, "a")).await.unwrap();
    assert!(first.created && !second.created);
    assert_eq!(first.id, second.id);
    assert_eq!(q.stats().await.unwrap().ready, 1);
    cleanup(q).await;
}

#[tokio::test]
async fn claim_respects_the_server_limit_and_rotates_over_servers() {
    let q = queue(Duration::from_secs(10)).await;
    q.set_limits(&[(ServerId(1), 2), (ServerId(2), 1)])
        .await
        .unwrap();
    for i in 0..5 {
        q.enqueue(&create(1, &format!("s1-{i}"))).await.unwrap();
        q.enqueue(&create(2, &format!("s2-{i}"))).await.unwrap();
    }
    let mut claimed = vec![];
    while let Some(job) = claim(&q).await {
        claimed.push(job);
    }
    let per_server = |s| claimed.iter().filter(|j| j.server == ServerId(s)).count();
    assert_eq!((per_server(1), per_server(2)), (2, 1), "limits are 2 and 1");
    // Fences grow with every claim.
    assert!(claimed.windows(2).all(|w| w[0].fence < w[1].fence));
    // Finishing one job of server 2 frees its slot.
    let done = claimed.iter().find(|j| j.server == ServerId(2)).unwrap();
    assert_eq!(finish(&q, done, &Finish::Done).await, FinishResult::Applied);
    let next = claim(&q).await.expect("a slot of server 2 is free again");
    assert_eq!(next.server, ServerId(2));
    assert!(claim(&q).await.is_none());
    cleanup(q).await;
}

#[tokio::test]
async fn an_attempt_whose_lease_expired_is_fenced_out() {
    let q = queue(Duration::from_millis(100)).await;
    q.set_limits(&[(ServerId(1), 5)]).await.unwrap();
    q.enqueue(&create(1, "z")).await.unwrap();
    let zombie = claim(&q).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(q.reap_expired(100).await.unwrap().0, 1);
    let fresh = claim(&q).await.unwrap();
    assert_eq!(fresh.id, zombie.id);
    assert_eq!(fresh.attempt, 2, "the lost attempt counted");
    assert!(fresh.fence > zombie.fence);
    assert_eq!(
        finish(&q, &zombie, &Finish::Done).await,
        FinishResult::Fenced
    );
    assert_eq!(
        finish(&q, &fresh, &Finish::Done).await,
        FinishResult::Applied
    );
    assert_eq!(q.stats().await.unwrap().done, 1);
    cleanup(q).await;
}

#[tokio::test]
async fn retries_wait_in_the_delayed_set_and_spent_attempts_dead_letter() {
    let q = queue(Duration::from_secs(10)).await;
    q.set_limits(&[(ServerId(1), 1)]).await.unwrap();
    q.enqueue(&create(1, "r")).await.unwrap();
    let mut job = claim(&q).await.unwrap();
    let retry = Finish::Retry {
        delay: Duration::from_millis(50),
        error: "503".into(),
        server_fault: false,
    };
    loop {
        let result = finish(&q, &job, &retry).await;
        if result == FinishResult::DeadLettered {
            break;
        }
        assert!(claim(&q).await.is_none(), "not due yet");
        tokio::time::sleep(Duration::from_millis(60)).await;
        job = claim(&q).await.expect("due after its delay");
    }
    assert_eq!(job.attempt, JobKind::CreateKey.max_attempts());
    let stats = q.stats().await.unwrap();
    assert_eq!((stats.dead, stats.ready, stats.delayed), (1, 0, 0));
    cleanup(q).await;
}

#[tokio::test]
async fn release_gives_the_job_back_without_spending_an_attempt() {
    let q = queue(Duration::from_secs(10)).await;
    q.enqueue(&create(1, "x")).await.unwrap();
    let job = claim(&q).await.unwrap();
    q.finish(&job, &Finish::Release).await.unwrap();
    let again = claim(&q).await.unwrap();
    assert_eq!(again.attempt, 1);
    cleanup(q).await;
}

#[tokio::test]
async fn the_same_key_with_another_payload_is_refused() {
    let q = queue(Duration::from_secs(10)).await;
    let first = q.enqueue_keyed("order-17", &create(1, "a")).await.unwrap();
    assert_eq!(
        q.enqueue_keyed("order-17", &create(1, "a")).await.unwrap(),
        Enqueued {
            created: false,
            ..first
        }
    );
    let err = q
        .enqueue_keyed("order-17", &create(2, "a"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("order-17") && err.to_string().contains("different payload"),
        "{err}"
    );
    assert!(q.enqueue_keyed("", &create(1, "a")).await.is_err());
    // Once the job is done the key is released: the operation can be asked for again.
    let job = claim(&q).await.unwrap();
    finish(&q, &job, &Finish::Done).await;
    assert!(
        q.enqueue_keyed("order-17", &create(2, "a"))
            .await
            .unwrap()
            .created
    );
    cleanup(q).await;
}

#[tokio::test]
async fn an_open_breaker_is_probed_with_health_checks_that_spend_no_job_attempts() {
    let mut config = config();
    config.breaker_threshold = 2;
    config.breaker_cooldown = Duration::from_millis(200);
    config.breaker_cooldown_cap = Duration::from_millis(300);
    let q = connect(config).await;
    q.set_limits(&[(ServerId(1), 4), (ServerId(2), 4)])
        .await
        .unwrap();
    for i in 0..4 {
        q.enqueue(&create(1, &format!("bad-{i}"))).await.unwrap();
    }
    q.enqueue(&create(2, "good")).await.unwrap();
    let fail = Finish::Retry {
        delay: Duration::ZERO,
        error: "503".into(),
        server_fault: true,
    };
    // Two transient failures of server 1 open its breaker.
    let mut taken = vec![];
    while taken
        .iter()
        .filter(|j: &&ClaimedJob| j.server == ServerId(1))
        .count()
        < 2
    {
        taken.push(claim(&q).await.unwrap());
    }
    let mut events = vec![];
    for job in taken.iter().filter(|j| j.server == ServerId(1)) {
        events.push(q.finish(job, &fail).await.unwrap().1);
    }
    assert_eq!(events, [BreakerEvent::Unchanged, BreakerEvent::Opened]);
    // Server 1's jobs (the two that failed are due again at once) now wait; server 2 is unaffected.
    let mut claimable = vec![];
    while let Some(job) = claim(&q).await {
        claimable.push(job);
    }
    assert!(
        claimable.iter().all(|j| j.server == ServerId(2)),
        "server 1 is paused: {claimable:?}"
    );
    // After the cool-down the claim hands out a health probe, not a job; while it runs, none of
    // the server's jobs is claimable.
    let probe = wait_for_probe(&q).await;
    assert_eq!(probe, ServerId(1));
    assert!(claim(&q).await.is_none(), "no job while the probe runs");
    // A failed probe keeps it open for twice the cool-down (capped at 300 ms).
    assert_eq!(
        q.probe_result(probe, false).await.unwrap(),
        ProbeOutcome::StillOpen
    );
    assert!(claim(&q).await.is_none());
    let probe = wait_for_probe(&q).await;
    assert_eq!(
        q.probe_result(probe, true).await.unwrap(),
        ProbeOutcome::Closed
    );
    assert_eq!(
        q.probe_result(probe, true).await.unwrap(),
        ProbeOutcome::Expired,
        "a probe is reported once"
    );
    // Closed: all four jobs are claimable at the full limit, and none spent an attempt while the
    // breaker was open (the two that failed spent one each).
    let mut back = vec![];
    while let Some(job) = claim(&q).await {
        back.push(job);
    }
    assert_eq!(back.len(), 4, "{back:?}");
    let attempts: u32 = back.iter().map(|j| j.attempt).sum();
    assert_eq!(attempts, 4 + 2);
    cleanup(q).await;
}

async fn wait_for_probe(q: &Queue) -> ServerId {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match q.claim("prober").await.unwrap() {
            Claim::Probe(server) => return server,
            Claim::Empty { next_due } => {
                assert!(std::time::Instant::now() < deadline, "no probe came due");
                tokio::time::sleep(
                    next_due
                        .unwrap_or(Duration::from_millis(20))
                        .max(Duration::from_millis(5)),
                )
                .await;
            }
            other => panic!("expected a probe, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn fences_never_go_backwards_when_redis_loses_its_data() {
    let q = queue(Duration::from_secs(10)).await;
    q.enqueue(&create(1, "f")).await.unwrap();
    let before = claim(&q).await.unwrap();
    assert!(
        before.fence > 1 << FENCE_EPOCH_SHIFT,
        "epoch 1 fences start above 2^40"
    );
    // Redis loses everything (a restart without persistence): nothing is claimable until the
    // queue is initialised again, from an epoch Postgres hands out.
    q.purge().await.unwrap();
    q.enqueue(&create(1, "f")).await.unwrap();
    assert!(matches!(q.claim("w").await.unwrap(), Claim::Uninitialized));
    assert!(q.initialize(2).await.unwrap(), "this call initialised it");
    assert!(
        !q.initialize(3).await.unwrap(),
        "only one caller re-derives the lost work"
    );
    let after = claim(&q).await.unwrap();
    assert!(
        after.fence > before.fence,
        "{} must exceed the pre-loss fence {}",
        after.fence,
        before.fence
    );
    // A restore from an old snapshot can leave the counter behind what Postgres saw; raising it
    // is exact and never lowers it.
    q.raise_fence(after.fence + 1_000).await.unwrap();
    assert_eq!(q.current_fence().await.unwrap(), after.fence + 1_000);
    q.raise_fence(5).await.unwrap();
    assert_eq!(q.current_fence().await.unwrap(), after.fence + 1_000);
    cleanup(q).await;
}

#[tokio::test]
async fn a_cancelled_backlog_neither_stalls_claims_nor_counts_as_ready() {
    let q = queue(Duration::from_secs(10)).await;
    q.set_limits(&[(ServerId(1), 1)]).await.unwrap();
    let subs: Vec<String> = (0..3000).map(|i| format!("c{i}")).collect();
    for sub in &subs {
        q.enqueue(&create(1, sub)).await.unwrap();
    }
    let doomed: Vec<JobPayload> = subs[..2999].iter().map(|s| create(1, s)).collect();
    assert_eq!(q.cancel(&doomed).await.unwrap(), 2999);
    assert_eq!(q.stats().await.unwrap().ready, 1);
    let job = claim(&q)
        .await
        .expect("the one live job behind 2,999 cancelled ids");
    assert_eq!(
        JobPayload::from_json(&job.payload).unwrap(),
        create(1, "c2999")
    );
    assert_eq!(q.stats().await.unwrap().ready, 0);
    cleanup(q).await;
}

#[tokio::test]
async fn jobs_of_one_key_never_run_at_once_and_run_in_intent_order() {
    let q = queue(Duration::from_secs(10)).await;
    q.set_limits(&[(ServerId(1), 4)]).await.unwrap();
    let sub = SubscriptionId::parse("k").unwrap();
    q.enqueue(&create(1, "k")).await.unwrap();
    let running = claim(&q).await.unwrap();
    q.enqueue(&JobPayload::delete(ServerId(1), sub.clone()))
        .await
        .unwrap();
    q.enqueue(&JobPayload::SyncConfig {
        server: ServerId(1),
        subscription: sub.clone(),
    })
    .await
    .unwrap();
    q.enqueue(&create(1, "other")).await.unwrap();
    // The delete and the sync wait for the running create; another key's job is not held up.
    let other = claim(&q).await.unwrap();
    assert_eq!(
        JobPayload::from_json(&other.payload).unwrap(),
        create(1, "other")
    );
    assert!(
        claim(&q).await.is_none(),
        "the key's other jobs wait for its lock"
    );
    assert_eq!(
        q.in_flight().await.unwrap(),
        vec![(ServerId(1), 2)],
        "waiting jobs hold no slot"
    );
    // A retry frees the lock too: the delete runs next, then the sync, one at a time.
    let retry = Finish::Retry {
        delay: Duration::from_secs(60),
        error: "503".into(),
        server_fault: false,
    };
    assert_eq!(finish(&q, &running, &retry).await, FinishResult::Applied);
    let delete = claim(&q).await.unwrap();
    assert_eq!(delete.attempt, 1, "parking spent no attempt");
    assert_eq!(
        JobPayload::from_json(&delete.payload).unwrap(),
        JobPayload::delete(ServerId(1), sub.clone())
    );
    assert!(claim(&q).await.is_none());
    finish(&q, &delete, &Finish::Done).await;
    let sync = claim(&q).await.unwrap();
    assert_eq!(
        JobPayload::from_json(&sync.payload).unwrap().kind(),
        JobKind::SyncConfig
    );
    // A waiting job can still be cancelled.
    q.enqueue(&JobPayload::delete(ServerId(1), sub.clone()))
        .await
        .unwrap();
    assert!(claim(&q).await.is_none());
    assert_eq!(
        q.cancel(&[JobPayload::delete(ServerId(1), sub.clone())])
            .await
            .unwrap(),
        1
    );
    finish(&q, &sync, &Finish::Done).await;
    assert!(claim(&q).await.is_none(), "the cancelled delete never runs");
    cleanup(q).await;
}

#[tokio::test]
async fn a_heartbeat_reports_a_job_that_redis_lost_as_lost() {
    let q = queue(Duration::from_secs(10)).await;
    q.enqueue(&create(1, "h")).await.unwrap();
    let job = claim(&q).await.unwrap();
    assert!(
        q.heartbeat(&[(job.id, job.fence)])
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        q.heartbeat(&[(job.id, job.fence + 1), (job.id, job.fence)])
            .await
            .unwrap(),
        vec![(job.id, job.fence + 1)],
        "another attempt's fence is lost, this attempt's is not"
    );
    q.purge().await.unwrap();
    assert_eq!(
        q.heartbeat(&[(job.id, job.fence)]).await.unwrap(),
        vec![(job.id, job.fence)]
    );
    cleanup(q).await;
}

#[tokio::test]
async fn requeue_runs_the_job_again_with_a_fresh_fence_and_no_attempt_spent() {
    let q = queue(Duration::from_secs(10)).await;
    q.enqueue(&create(1, "q")).await.unwrap();
    let job = claim(&q).await.unwrap();
    let requeue = Finish::Requeue {
        error: "fence behind Postgres".into(),
    };
    assert_eq!(finish(&q, &job, &requeue).await, FinishResult::Applied);
    let again = claim(&q).await.unwrap();
    assert_eq!((again.id, again.attempt, again.tries), (job.id, 1, 2));
    assert!(again.tried_before(), "it may have acted on the server");
    assert!(again.fence > job.fence);
    cleanup(q).await;
}

#[tokio::test]
async fn the_dead_set_keeps_what_its_retention_allows_and_discards_on_demand() {
    let mut config = config();
    config.dead_max_count = Some(3);
    let q = connect(config).await;
    let dead = Finish::Dead {
        error: "401".into(),
        server_fault: false,
    };
    let mut ids = vec![];
    for i in 0..5 {
        q.enqueue(&create(1, &format!("d{i}"))).await.unwrap();
        let job = claim(&q).await.unwrap();
        finish(&q, &job, &dead).await;
        ids.push(job.id);
    }
    assert_eq!(q.trim_dead().await.unwrap(), 2);
    let left: Vec<JobId> = q
        .dead_jobs(10)
        .await
        .unwrap()
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(left.len(), 3);
    assert!(
        !left.contains(&ids[0]) && !left.contains(&ids[1]),
        "the oldest go first"
    );
    // Read a page at a time, the pages add up to the whole set in the same order.
    let (first, more) = q.dead_jobs_page(0, 2).await.unwrap();
    assert!(more && first.len() == 2);
    let (second, more) = q.dead_jobs_page(2, 2).await.unwrap();
    assert!(!more && second.len() == 1);
    let paged: Vec<JobId> = first.iter().chain(&second).map(|d| d.id).collect();
    assert_eq!(paged, left);
    assert_eq!(q.discard(&[ids[4], ids[0]]).await.unwrap(), vec![ids[4]]);
    assert_eq!(q.stats().await.unwrap().dead, 2);
    cleanup(q).await;
}

#[tokio::test]
async fn dead_jobs_are_listed_with_their_reason_and_can_be_replayed() {
    let q = queue(Duration::from_secs(10)).await;
    q.enqueue(&create(1, "d")).await.unwrap();
    let job = claim(&q).await.unwrap();
    q.finish(
        &job,
        &Finish::Dead {
            error: "401 Invalid API key".into(),
            server_fault: false,
        },
    )
    .await
    .unwrap();
    let dead = q.dead_jobs(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].id, dead[0].attempts, dead[0].error.as_str()),
        (job.id, 1, "401 Invalid API key")
    );
    assert_eq!(
        q.replay(&[job.id, JobId(999_999)]).await.unwrap(),
        vec![
            (job.id, ReplayOutcome::Replayed),
            (JobId(999_999), ReplayOutcome::NotDead)
        ]
    );
    let again = claim(&q).await.unwrap();
    assert_eq!((again.id, again.attempt), (job.id, 1));
    // A replay never doubles a live operation.
    q.finish(
        &again,
        &Finish::Dead {
            error: "x".into(),
            server_fault: false,
        },
    )
    .await
    .unwrap();
    let live = q.enqueue(&create(1, "d")).await.unwrap();
    assert!(live.created);
    assert_eq!(
        q.replay(&[job.id]).await.unwrap(),
        vec![(job.id, ReplayOutcome::Superseded)]
    );
    assert_eq!(q.stats().await.unwrap().ready, 1);
    cleanup(q).await;
}

#[tokio::test]
async fn jobs_queued_by_a_version_without_ready_counts_stay_claimable() {
    let url = redis_url();
    let q = Queue::connect(&url, config()).unwrap();
    q.set_limits(&[(ServerId(1), 4)]).await.unwrap();
    q.enqueue(&create(1, "old")).await.unwrap();
    q.enqueue(&create(1, "older")).await.unwrap();
    // What an older keyfleet left in Redis: the job in its ready list, no count, no epoch.
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(q.redis_key("nready"))
        .arg(q.redis_key("epoch"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(q.initialize(1).await.unwrap());
    assert_eq!(q.stats().await.unwrap().ready, 2);
    assert!(claim(&q).await.is_some(), "the old jobs are claimable");
    assert!(claim(&q).await.is_some(), "all of them");
    cleanup(q).await;
}

fn sync(server: i64, sub: &str) -> JobPayload {
    JobPayload::SyncConfig {
        server: ServerId(server),
        subscription: SubscriptionId::parse(sub).unwrap(),
    }
}

#[tokio::test]
async fn a_purchase_goes_ahead_of_a_backlog_of_config_syncs() {
    let q = queue(Duration::from_secs(10)).await;
    q.set_limits(&[(ServerId(1), 1)]).await.unwrap();
    let backlog: Vec<JobPayload> = (0..5000).map(|i| sync(1, &format!("c{i}"))).collect();
    for chunk in backlog.chunks(500) {
        q.enqueue_all(chunk).await.unwrap();
    }
    let in_flight = claim(&q).await.unwrap();
    q.enqueue_in(Lane::Urgent, &create(1, "buyer"))
        .await
        .unwrap();
    assert!(claim(&q).await.is_none(), "the server is at its limit");
    // The finish of the request in flight claims the next job in the same call, as a worker's does.
    let (_, _, next) = q
        .finish_and_claim(&in_flight, &Finish::Done, "test-worker")
        .await
        .unwrap();
    let Some(Claim::Job(next)) = next else {
        panic!("expected a job, got {next:?}")
    };
    assert_eq!(
        JobPayload::from_json(&next.payload).unwrap(),
        create(1, "buyer"),
        "the purchase waited only for the request in flight"
    );
    assert_eq!(q.stats().await.unwrap().ready, 4999);
    // A retried urgent job stays urgent.
    let retry = Finish::Retry {
        delay: Duration::ZERO,
        error: "503".into(),
        server_fault: false,
    };
    finish(&q, &next, &retry).await;
    let again = claim(&q).await.unwrap();
    assert_eq!(again.id, next.id);
    cleanup(q).await;
}

#[tokio::test]
async fn a_stream_of_urgent_jobs_does_not_starve_the_normal_lane() {
    let q = queue(Duration::from_secs(10)).await;
    q.set_limits(&[(ServerId(1), 1)]).await.unwrap();
    for i in 0..20 {
        q.enqueue(&sync(1, &format!("n{i}"))).await.unwrap();
    }
    for i in 0..40 {
        q.enqueue_in(Lane::Urgent, &create(1, &format!("u{i}")))
            .await
            .unwrap();
    }
    let mut kinds = vec![];
    for _ in 0..45 {
        let job = claim(&q).await.unwrap();
        kinds.push(JobPayload::from_json(&job.payload).unwrap().kind());
        finish(&q, &job, &Finish::Done).await;
    }
    let normal = kinds.iter().filter(|k| **k == JobKind::SyncConfig).count();
    assert_eq!(
        normal, 5,
        "one claim in nine goes to the normal lane: {kinds:?}"
    );
    assert!(
        kinds[..8].iter().all(|k| *k == JobKind::CreateKey) && kinds[8] == JobKind::SyncConfig,
        "{kinds:?}"
    );
    cleanup(q).await;
}

/// A redis-server of the test's own, with these settings, on a free loopback port.
struct OwnRedis(std::process::Child, u16);

impl OwnRedis {
    async fn start(settings: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(settings)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let redis = Self(child, port);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return redis;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server did not listen");
    }

    fn queue(&self) -> Queue {
        Queue::connect(&format!("redis://127.0.0.1:{}", self.1), config()).unwrap()
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn settings_that_lose_work_are_named_at_start_up() {
    let dir = std::env::temp_dir().join(format!("kf-redis-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let dir = dir.to_str().unwrap().to_owned();
    let evicting = OwnRedis::start(&[
        "--maxmemory",
        "64mb",
        "--maxmemory-policy",
        "allkeys-lru",
        "--save",
        "",
        "--appendonly",
        "no",
    ])
    .await;
    let warnings = evicting.queue().settings_warnings().await;
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings[0].contains("maxmemory-policy noeviction"),
        "{warnings:?}"
    );
    assert!(
        warnings[1].contains("keeps nothing on disk"),
        "{warnings:?}"
    );
    let right = OwnRedis::start(&[
        "--maxmemory",
        "64mb",
        "--maxmemory-policy",
        "noeviction",
        "--appendonly",
        "yes",
        "--dir",
        &dir,
    ])
    .await;
    let queue = right.queue();
    assert_eq!(queue.settings_warnings().await, Vec::<String>::new());
    // Keys an older keyfleet wrote before the hash tags.
    let legacy = format!("{}:epoch", queue.config().prefix);
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{}", right.1))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&legacy)
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let warnings = queue.settings_warnings().await;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("before hash tags"), "{warnings:?}");
    drop(right);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A plain connection, to read what the scripts left in Redis.
async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn cmd<T: redis::FromRedisValue>(
    conn: &mut redis::aio::MultiplexedConnection,
    args: &[&str],
) -> T {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query_async(conn).await.unwrap()
}

/// The servers of the jobs in a set or list, by reading each job's hash (`state`: only jobs in it).
async fn servers_of(
    conn: &mut redis::aio::MultiplexedConnection,
    q: &Queue,
    ids: Vec<String>,
    state: Option<&str>,
) -> Vec<i64> {
    let mut out = vec![];
    for id in ids {
        let (server, st): (Option<i64>, Option<String>) = cmd(
            conn,
            &["HMGET", &key(q, &format!("job:{id}")), "server", "state"],
        )
        .await;
        if let Some(server) = server
            && (state.is_none() || st.as_deref() == state)
        {
            out.push(server);
        }
    }
    out
}

async fn zset_servers(
    conn: &mut redis::aio::MultiplexedConnection,
    q: &Queue,
    name: &str,
    state: Option<&str>,
) -> Vec<i64> {
    let ids = cmd(conn, &["ZRANGE", &key(q, name), "0", "-1"]).await;
    servers_of(conn, q, ids, state).await
}

fn key(q: &Queue, suffix: &str) -> String {
    q.redis_key(suffix)
}

/// `server_stats()` worked out the slow way: every ready list, the delayed, dead and lease sets
/// read whole and each job's hash looked up.
async fn stats_read_directly(q: &Queue) -> Vec<ServerQueueStats> {
    let mut conn = raw().await;
    let mut servers: Vec<i64> = cmd(&mut conn, &["SMEMBERS", &key(q, "servers")]).await;
    servers.extend(cmd::<Vec<i64>>(&mut conn, &["HKEYS", &key(q, "limits")]).await);
    servers.extend(cmd::<Vec<i64>>(&mut conn, &["SMEMBERS", &key(q, "held")]).await);
    servers.sort();
    servers.dedup();
    let delayed = zset_servers(&mut conn, q, "delayed", None).await;
    let dead = zset_servers(&mut conn, q, "dead", None).await;
    let leased = zset_servers(&mut conn, q, "leases", Some("running")).await;
    let mut out = vec![];
    for s in servers {
        let mut ready = 0;
        for lane in ["urgent", "ready"] {
            let ids: Vec<String> = cmd(
                &mut conn,
                &["LRANGE", &key(q, &format!("{lane}:{s}")), "0", "-1"],
            )
            .await;
            ready += servers_of(&mut conn, q, ids, Some("ready")).await.len() as u64;
        }
        let n = |v: &[i64]| v.iter().filter(|x| **x == s).count() as u64;
        let id = s.to_string();
        let probing: Option<f64> = cmd(&mut conn, &["ZSCORE", &key(q, "probing"), &id]).await;
        let open: Option<f64> = cmd(&mut conn, &["ZSCORE", &key(q, "paused"), &id]).await;
        let limit: Option<u32> = cmd(&mut conn, &["HGET", &key(q, "limits"), &id]).await;
        let held: bool = cmd(&mut conn, &["SISMEMBER", &key(q, "held"), &id]).await;
        out.push(ServerQueueStats {
            server: ServerId(s),
            ready,
            delayed: n(&delayed),
            running: n(&leased) + u64::from(probing.is_some()),
            dead: n(&dead),
            limit,
            breaker: match (probing, open) {
                (Some(_), _) => Breaker::Probing,
                (None, Some(_)) => Breaker::Open,
                (None, None) => Breaker::Closed,
            },
            paused: held,
        });
    }
    out
}

/// Asserts the exact per-server counts match Redis's sets and lists, and returns them.
async fn assert_server_stats(q: &Queue, step: &str) -> Vec<ServerQueueStats> {
    let stats = q.server_stats().await.unwrap();
    assert_eq!(stats, stats_read_directly(q).await, "after {step}");
    stats
}

/// Claims everything claimable and keeps the jobs in `wanted`, giving the others back unstarted.
async fn take(q: &Queue, wanted: &[JobId]) -> Vec<ClaimedJob> {
    let mut kept = vec![];
    let mut others = vec![];
    while let Some(job) = claim(q).await {
        if wanted.contains(&job.id) {
            kept.push(job);
        } else {
            others.push(job);
        }
    }
    for job in others.iter().rev() {
        finish(q, job, &Finish::Release).await;
    }
    assert_eq!(
        kept.len(),
        wanted.len(),
        "not all of {wanted:?} were claimable"
    );
    kept
}

fn traffic(server: i64) -> JobPayload {
    JobPayload::CollectTraffic {
        server: ServerId(server),
    }
}

#[tokio::test]
async fn per_server_counts_stay_exact_through_every_transition() {
    let mut config = config();
    config.lease = Duration::from_millis(150);
    config.dead_max_count = Some(2);
    let q = connect(config).await;
    q.set_limits(&[(ServerId(1), 3), (ServerId(2), 2), (ServerId(3), 1)])
        .await
        .unwrap();
    let known = assert_server_stats(&q, "limits only").await;
    assert_eq!(known.len(), 3, "a limit makes a server known: {known:?}");
    let a = q.enqueue(&create(1, "a")).await.unwrap().id;
    let b = q.enqueue(&create(1, "b")).await.unwrap().id;
    let c = q.enqueue_in(Lane::Urgent, &traffic(2)).await.unwrap().id;
    let stats = assert_server_stats(&q, "enqueues").await;
    assert_eq!((stats[0].ready, stats[1].ready), (2, 1));

    let retry = |ms| Finish::Retry {
        delay: Duration::from_millis(ms),
        error: "503".into(),
        server_fault: false,
    };
    let [job] = take(&q, &[a]).await.try_into().unwrap();
    assert_server_stats(&q, "a claim").await;
    finish(&q, &job, &retry(0)).await;
    assert_eq!(assert_server_stats(&q, "a retry").await[0].delayed, 1);
    // The next claim promotes the due retry (and takes it).
    let [job] = take(&q, &[a]).await.try_into().unwrap();
    assert_eq!(assert_server_stats(&q, "promotion").await[0].delayed, 0);
    finish(&q, &job, &retry(60_000)).await;
    assert_eq!(assert_server_stats(&q, "a long retry").await[0].delayed, 1);
    assert_eq!(q.cancel(&[create(1, "a")]).await.unwrap(), 1);
    assert_eq!(assert_server_stats(&q, "cancelling it").await[0].delayed, 0);

    let dead = Finish::Dead {
        error: "401".into(),
        server_fault: false,
    };
    let [job] = take(&q, &[b]).await.try_into().unwrap();
    finish(&q, &job, &dead).await;
    assert_eq!(assert_server_stats(&q, "a dead finish").await[0].dead, 1);

    // The reaper takes c back twice, then dead-letters it on its third lost lease.
    for attempt in 1..=JobKind::CollectTraffic.max_attempts() {
        take(&q, &[c]).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (n, buried) = q.reap_expired(100).await.unwrap();
        assert_eq!(n, 1);
        assert_eq!(buried.len(), usize::from(attempt == 3));
        assert_server_stats(&q, &format!("reaping attempt {attempt}")).await;
    }
    assert_eq!(q.server_stats().await.unwrap()[1].dead, 1);

    assert_eq!(
        q.replay(&[b]).await.unwrap(),
        vec![(b, ReplayOutcome::Replayed)]
    );
    let stats = assert_server_stats(&q, "a replay").await;
    assert_eq!((stats[0].dead, stats[0].ready), (0, 1));
    q.enqueue(&traffic(2)).await.unwrap();
    assert_eq!(
        q.replay(&[c]).await.unwrap(),
        vec![(c, ReplayOutcome::Superseded)]
    );
    assert_eq!(
        assert_server_stats(&q, "a superseded replay").await[1].dead,
        0
    );

    let mut buried = vec![];
    for (server, sub) in [(1, "d1"), (3, "d2"), (3, "d3"), (1, "d4")] {
        let id = q.enqueue(&create(server, sub)).await.unwrap().id;
        let [job] = take(&q, &[id]).await.try_into().unwrap();
        finish(&q, &job, &dead).await;
        buried.push(id);
    }
    assert_eq!(q.discard(&[buried[3]]).await.unwrap(), vec![buried[3]]);
    assert_server_stats(&q, "a discard").await;
    assert_eq!(q.trim_dead().await.unwrap(), 1, "three dead, two kept");
    let stats = assert_server_stats(&q, "trimming").await;
    assert_eq!((stats[0].dead, stats[2].dead), (0, 2));

    // A Redis initialised over data the counts do not match (an older version's, or a restore)
    // recounts them.
    let [job] = take(&q, &[b]).await.try_into().unwrap();
    finish(&q, &job, &retry(60_000)).await;
    let mut conn = raw().await;
    let _: () = cmd(&mut conn, &["DEL", &key(&q, "ndelayed"), &key(&q, "epoch")]).await;
    let _: () = cmd(&mut conn, &["HSET", &key(&q, "ndead"), "1", "7", "3", "0"]).await;
    assert!(q.initialize(2).await.unwrap());
    let stats = assert_server_stats(&q, "initialising").await;
    assert_eq!((stats[0].delayed, stats[0].dead, stats[2].dead), (1, 0, 2));
    cleanup(q).await;
}

#[tokio::test]
async fn a_paused_server_hands_out_nothing_until_resumed_and_keeps_its_limit() {
    let q = queue(Duration::from_secs(10)).await;
    q.set_limits(&[(ServerId(1), 2), (ServerId(2), 1)])
        .await
        .unwrap();
    q.enqueue(&create(1, "running")).await.unwrap();
    let running = claim(&q).await.unwrap();
    assert!(q.pause_server(ServerId(1)).await.unwrap());
    assert!(
        !q.pause_server(ServerId(1)).await.unwrap(),
        "already paused"
    );
    assert_eq!(q.paused_servers().await.unwrap(), vec![ServerId(1)]);
    for i in 0..4 {
        q.enqueue(&create(1, &format!("p{i}"))).await.unwrap();
        q.enqueue(&create(2, &format!("o{i}"))).await.unwrap();
    }
    let stats = assert_server_stats(&q, "pausing").await;
    assert_eq!(
        (stats[0].ready, stats[0].paused),
        (4, true),
        "enqueues still queue"
    );
    // Only server 2's jobs are claimed, one at a time (its limit), while server 1 is paused; the
    // job server 1 was running finishes as usual, and frees no slot to claim.
    let other = claim(&q).await.unwrap();
    assert_eq!(other.server, ServerId(2));
    assert!(claim(&q).await.is_none());
    assert_eq!(
        finish(&q, &running, &Finish::Done).await,
        FinishResult::Applied
    );
    finish(&q, &other, &Finish::Done).await;
    let other = claim(&q).await.unwrap();
    assert_eq!(other.server, ServerId(2));
    assert!(claim(&q).await.is_none(), "server 1 stays paused");

    let wake = keyfleet_queue::WakeSignal::spawn(&q);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while wake.generation() == 0 {
        assert!(std::time::Instant::now() < deadline, "never subscribed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen = wake.generation();
    assert!(q.resume_server(ServerId(1)).await.unwrap());
    assert!(!q.resume_server(ServerId(1)).await.unwrap(), "not paused");
    tokio::time::timeout(Duration::from_secs(2), wake.clone().changed_since(seen))
        .await
        .expect("resuming wakes idle workers");
    assert!(q.paused_servers().await.unwrap().is_empty());
    // Claimable at once, up to its limit of 2.
    let back: Vec<ClaimedJob> = [claim(&q).await, claim(&q).await, claim(&q).await]
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(back.len(), 2, "{back:?}");
    assert!(back.iter().all(|j| j.server == ServerId(1)));
    assert_eq!(
        assert_server_stats(&q, "resuming").await[0].running,
        2,
        "at its limit"
    );
    // Round-robin over servers as before: with slots free on both, claims alternate.
    finish(&q, &other, &Finish::Done).await;
    for job in &back {
        finish(&q, job, &Finish::Done).await;
    }
    q.set_limits(&[(ServerId(1), 5), (ServerId(2), 5)])
        .await
        .unwrap();
    let mut servers = vec![];
    while let Some(job) = claim(&q).await {
        servers.push(job.server.0);
    }
    assert_eq!(servers.len(), 4, "two jobs left on each: {servers:?}");
    assert!(servers.windows(2).all(|w| w[0] != w[1]), "{servers:?}");
    cleanup(q).await;
}

#[tokio::test]
async fn a_paused_server_gets_no_health_probe_until_resumed() {
    let mut config = config();
    config.breaker_threshold = 1;
    config.breaker_cooldown = Duration::from_millis(100);
    let q = connect(config).await;
    q.enqueue(&create(1, "b")).await.unwrap();
    let job = claim(&q).await.unwrap();
    assert!(q.pause_server(ServerId(1)).await.unwrap());
    // The breaker opens while the server is paused.
    let fail = Finish::Retry {
        delay: Duration::ZERO,
        error: "503".into(),
        server_fault: true,
    };
    assert_eq!(q.finish(&job, &fail).await.unwrap().1, BreakerEvent::Opened);
    tokio::time::sleep(Duration::from_millis(150)).await;
    for _ in 0..3 {
        assert!(
            matches!(q.claim("w").await.unwrap(), Claim::Empty { .. }),
            "no probe for a paused server whose cool-down ended"
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let stats = assert_server_stats(&q, "a paused open breaker").await;
    assert_eq!((stats[0].breaker, stats[0].paused), (Breaker::Open, true));
    assert!(q.resume_server(ServerId(1)).await.unwrap());
    assert!(
        matches!(q.claim("w").await.unwrap(), Claim::Probe(ServerId(1))),
        "the probe is due as soon as the server is resumed"
    );
    assert_eq!(
        assert_server_stats(&q, "the probe").await[0].breaker,
        Breaker::Probing
    );
    cleanup(q).await;
}

/// A burst is claimed in one call, within every server's limit, rotating over servers as single
/// claims do; the claims end with what a claim finds when nothing is left.
#[tokio::test]
async fn several_jobs_are_claimed_in_one_call_within_the_limits() {
    let q = queue(Duration::from_secs(10)).await;
    q.set_limits(&[(ServerId(1), 2), (ServerId(2), 1)])
        .await
        .unwrap();
    for i in 0..5 {
        q.enqueue(&create(1, &format!("s1-{i}"))).await.unwrap();
        q.enqueue(&create(2, &format!("s2-{i}"))).await.unwrap();
    }
    let claims = q.claim_many("w", 10).await.unwrap();
    let (jobs, last) = claims.split_at(claims.len() - 1);
    let jobs: Vec<&ClaimedJob> = jobs
        .iter()
        .map(|claim| match claim {
            Claim::Job(job) => job,
            other => panic!("expected a job, got {other:?}"),
        })
        .collect();
    let servers: Vec<i64> = jobs.iter().map(|job| job.server.0).collect();
    assert_eq!(servers, [1, 2, 1], "both servers' limits held");
    assert!(
        jobs.windows(2).all(|w| w[0].fence < w[1].fence),
        "a fence per claim"
    );
    assert!(
        matches!(last, [Claim::Empty { next_due: None }]),
        "{last:?}"
    );
    assert_eq!(q.claim_many("w", 1).await.unwrap().len(), 1);
    assert_eq!(q.stats().await.unwrap().running, 3);
    cleanup(q).await;
}

/// Several attempts end in one script call: each is fenced on its own, each applied one frees its
/// slot, and the claims made for those slots obey the limits as single claims do.
#[tokio::test]
async fn several_finishes_end_in_one_call_each_fenced_on_its_own() {
    let q = queue(Duration::from_secs(10)).await;
    q.set_limits(&[(ServerId(1), 2), (ServerId(2), 1)])
        .await
        .unwrap();
    for i in 0..4 {
        q.enqueue(&create(1, &format!("s1-{i}"))).await.unwrap();
    }
    q.enqueue(&create(2, "s2-0")).await.unwrap();
    let mut held = vec![];
    while let Some(job) = claim(&q).await {
        held.push(job);
    }
    held.sort_by_key(|job| job.server.0);
    let [a, b, c] = <[ClaimedJob; 3]>::try_from(held).unwrap();
    assert_eq!(
        (a.server, b.server, c.server),
        (ServerId(1), ServerId(1), ServerId(2)),
        "every server at its limit"
    );
    let stale = ClaimedJob {
        fence: b.fence - 1,
        ..b.clone()
    };
    let retry = Finish::Retry {
        delay: Duration::from_secs(60),
        error: "503".into(),
        server_fault: false,
    };
    // Server 1's a done and b's stale attempt (fenced), server 2's c retried; claims asked for
    // all three.
    let (ended, claims) = q
        .finish_many(
            &[
                (&a, &Finish::Done, true),
                (&stale, &Finish::Done, true),
                (&c, &retry, true),
            ],
            Some("w"),
        )
        .await
        .unwrap();
    let results: Vec<FinishResult> = ended.iter().map(|(r, _)| *r).collect();
    assert_eq!(
        results,
        [
            FinishResult::Applied,
            FinishResult::Fenced,
            FinishResult::Applied
        ]
    );
    // Two slots freed (a's and c's), so two claims: server 1 fills its freed slot, and the second
    // finds nothing (server 2's only job waits out its back-off; b still holds server 1's other
    // slot) and says so, as a claim does.
    match claims.as_slice() {
        [Claim::Job(job), Claim::Empty { next_due: Some(_) }] => {
            assert_eq!(job.server, ServerId(1));
            assert!(job.fence > c.fence);
        }
        other => panic!("expected a job of server 1, then nothing: {other:?}"),
    }
    let stats = q.stats().await.unwrap();
    assert_eq!(
        (stats.running, stats.delayed, stats.done),
        (2, 1, 1),
        "{stats:?}"
    );
    cleanup(q).await;
}

/// A finish may claim the next job in the same script call: the same claim as `claim` (ring
/// order, per-server limits, fences), and none when the finish is fenced out.
#[tokio::test]
async fn a_finish_claims_the_next_job_in_the_same_call() {
    let q = queue(Duration::from_secs(10)).await;
    q.set_limits(&[(ServerId(1), 1), (ServerId(2), 1)])
        .await
        .unwrap();
    for i in 0..2 {
        q.enqueue(&create(1, &format!("s1-{i}"))).await.unwrap();
    }
    q.enqueue(&create(2, "s2-0")).await.unwrap();
    let first = claim(&q).await.unwrap();
    assert_eq!(first.server, ServerId(1));

    // Server 1 is at its limit, so the claim takes server 2's job; its own slot freed by this
    // finish puts server 1 back in the ring behind it.
    let (result, _, next) = q
        .finish_and_claim(&first, &Finish::Done, "w")
        .await
        .unwrap();
    assert_eq!(result, FinishResult::Applied);
    let Some(Claim::Job(second)) = next else {
        panic!("expected a job, got {next:?}")
    };
    assert_eq!((second.server, second.attempt), (ServerId(2), 1));
    assert!(second.fence > first.fence);
    let (_, _, next) = q
        .finish_and_claim(&second, &Finish::Done, "w")
        .await
        .unwrap();
    let Some(Claim::Job(third)) = next else {
        panic!("expected a job, got {next:?}")
    };
    assert_eq!(third.server, ServerId(1));
    let running: Vec<u64> = assert_server_stats(&q, "finish and claim")
        .await
        .iter()
        .map(|s| s.running)
        .collect();
    assert_eq!(running, [1, 0], "one slot each, as a plain claim would");

    // A fenced-out finish claims nothing: its caller's slot was never freed by it.
    let stale = ClaimedJob {
        fence: first.fence,
        ..third.clone()
    };
    let (result, _, next) = q
        .finish_and_claim(&stale, &Finish::Done, "w")
        .await
        .unwrap();
    assert_eq!((result, next.is_none()), (FinishResult::Fenced, true));
    // With nothing left it says so, as a claim does.
    let (_, _, next) = q
        .finish_and_claim(&third, &Finish::Done, "w")
        .await
        .unwrap();
    assert!(
        matches!(next, Some(Claim::Empty { next_due: None })),
        "{next:?}"
    );
    assert_eq!(q.stats().await.unwrap().done, 3);
    cleanup(q).await;
}

/// Claimers idle only when they found the ring of claimable servers empty, so a wake-up is
/// published only when a script call leaves it non-empty after starting with it empty: one per
/// burst of work, not one per enqueue or freed slot.
#[tokio::test]
async fn a_wake_up_is_published_only_when_the_ring_stops_being_empty() {
    let q = queue(Duration::from_secs(10)).await;
    q.set_limits(&[(ServerId(1), 1), (ServerId(2), 1)])
        .await
        .unwrap();
    let channel = q.redis_key("wake");
    let client = redis::Client::open(redis_url()).unwrap();
    let mut subscriber = client.get_async_pubsub().await.unwrap();
    subscriber.subscribe(&channel).await.unwrap();

    q.enqueue(&create(1, "a")).await.unwrap(); // empty ring -> [1]: wake
    q.enqueue(&create(2, "b")).await.unwrap(); // [1] -> [1, 2]: none
    q.enqueue(&create(1, "c")).await.unwrap(); // already in: none
    let one = claim(&q).await.unwrap(); // 1 at its limit leaves the ring
    let two = claim(&q).await.unwrap(); // empty ring
    assert!(claim(&q).await.is_none());
    finish(&q, &two, &Finish::Done).await; // 2 has nothing ready: stays out
    // Server 1's freed slot puts it back in the ring: wake. The claim in the same call takes it
    // off again: still published (a claimer elsewhere may race for it; harmless).
    let (_, _, next) = q.finish_and_claim(&one, &Finish::Done, "w").await.unwrap();
    let Some(Claim::Job(last)) = next else {
        panic!("expected a job, got {next:?}")
    };
    q.set_limits(&[(ServerId(2), 2)]).await.unwrap(); // 2 is not in the ring: none
    q.enqueue(&create(1, "d")).await.unwrap(); // 1 is at its limit: none
    q.enqueue(&create(2, "e")).await.unwrap(); // empty ring -> [2]: wake
    q.enqueue(&create(2, "f")).await.unwrap();
    // Takes 2 off the ring and puts it back (below its limit, f ready): no wake from a claim.
    let e = claim(&q).await.unwrap();
    assert_eq!(e.server, ServerId(2));
    // 1's freed slot joins a ring that holds 2: none.
    let (_, _, next) = q.finish_and_claim(&last, &Finish::Done, "w").await.unwrap();
    let Some(Claim::Job(f)) = next else {
        panic!("expected a job, got {next:?}")
    };
    for job in [&e, &f] {
        finish(&q, job, &Finish::Done).await;
    }

    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("PUBLISH")
        .arg(&channel)
        .arg("end")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut published = vec![];
    let mut messages = subscriber.on_message();
    loop {
        let message = tokio::time::timeout(
            Duration::from_secs(5),
            futures::StreamExt::next(&mut messages),
        )
        .await
        .expect("the end marker arrives")
        .unwrap();
        let payload: String = message.get_payload().unwrap();
        if payload == "end" {
            break;
        }
        published.push(payload);
    }
    assert_eq!(published, ["1", "1", "2"]);
    drop(messages);
    cleanup(q).await;
}

/// The ring holds exactly the servers that can be claimed from now (ready work, a free slot, a
/// closed breaker, no operator's pause), once each, whatever happens: a seeded random walk over
/// every script that moves a job or a server, checked against the queue read the slow way after
/// each step. The scripts keep the ring by what each step can change (a finish that leaves its
/// server in the ring does not look again unless it opened the breaker); this is what says those
/// shortcuts are sound.
#[tokio::test]
async fn the_ring_holds_exactly_the_claimable_servers_through_a_random_walk() {
    use rand::{Rng, SeedableRng, rngs::StdRng};

    let mut config = config();
    config.breaker_threshold = 2;
    config.breaker_cooldown = Duration::from_millis(1);
    let q = connect(config).await;
    let mut rng = StdRng::seed_from_u64(8);
    let mut held: Vec<ClaimedJob> = vec![];
    let mut conn = raw().await;
    let take_probe = |claim: Claim, held: &mut Vec<ClaimedJob>| -> Option<ServerId> {
        match claim {
            Claim::Job(job) => {
                held.push(job);
                None
            }
            Claim::Probe(server) => Some(server),
            Claim::Empty { .. } => None,
            Claim::Uninitialized => panic!("initialised at the start"),
        }
    };
    for step in 0..1000 {
        let server = rng.random_range(1..=4);
        let mut probe = None;
        let what = rng.random_range(0..100);
        if what < 30 {
            let sub = format!("s{}", rng.random_range(0..60));
            let lane = if rng.random_bool(0.3) {
                Lane::Urgent
            } else {
                Lane::Normal
            };
            q.enqueue_in(lane, &create(server, &sub)).await.unwrap();
        } else if what < 50 || held.is_empty() {
            probe = take_probe(q.claim("walk").await.unwrap(), &mut held);
        } else if what < 85 {
            let job = held.swap_remove(rng.random_range(0..held.len()));
            let how = match rng.random_range(0..10) {
                0..=4 => Finish::Done,
                5..=7 => Finish::Retry {
                    delay: Duration::ZERO,
                    error: "503".into(),
                    server_fault: rng.random_bool(0.7),
                },
                8 => Finish::Dead {
                    error: "no".into(),
                    server_fault: false,
                },
                _ => Finish::Release,
            };
            if rng.random_bool(0.5) {
                let (_, _, next) = q.finish_and_claim(&job, &how, "walk").await.unwrap();
                probe = next.and_then(|claim| take_probe(claim, &mut held));
            } else {
                q.finish(&job, &how).await.unwrap();
            }
        } else if what < 92 {
            if rng.random_bool(0.5) {
                q.pause_server(ServerId(server)).await.unwrap();
            } else {
                q.resume_server(ServerId(server)).await.unwrap();
            }
        } else {
            q.set_limits(&[(ServerId(server), rng.random_range(1..=3))])
                .await
                .unwrap();
        }
        if let Some(server) = probe {
            q.probe_result(server, rng.random_bool(0.6)).await.unwrap();
        }

        let stats = assert_server_stats(&q, &format!("step {step}")).await;
        let mut want: Vec<i64> = stats
            .iter()
            .filter(|s| {
                s.ready > 0
                    && s.running < u64::from(s.limit.unwrap_or(1))
                    && s.breaker == Breaker::Closed
                    && !s.paused
            })
            .map(|s| s.server.0)
            .collect();
        want.sort();
        let mut ring: Vec<i64> = cmd(&mut conn, &["LRANGE", &key(&q, "ring"), "0", "-1"]).await;
        let mut members: Vec<i64> = cmd(&mut conn, &["SMEMBERS", &key(&q, "inring")]).await;
        ring.sort();
        members.sort();
        assert_eq!(ring, want, "the ring after step {step}: {stats:?}");
        assert_eq!(members, want, "the ring's member set after step {step}");
    }
    cleanup(q).await;
}
