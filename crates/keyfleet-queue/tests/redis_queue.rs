//! The queue's scripts against a real Redis (REDIS_URL, default 127.0.0.1:6379), one key prefix
//! per test, checked empty afterwards.

use std::time::Duration;

use keyfleet_core::{JobKind, JobPayload, ServerId, SubscriptionId};
use keyfleet_queue::{
    Claim, ClaimedJob, Enqueued, Finish, FinishResult, JobId, Queue, QueueConfig, ReplayOutcome,
};

fn queue(lease: Duration) -> Queue {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut config = QueueConfig::new(format!("kftest:{}", uuid::Uuid::new_v4().simple()));
    config.lease = lease;
    Queue::connect(&url, config).unwrap()
}

fn create(server: i64, sub: &str) -> JobPayload {
    JobPayload::create(ServerId(server), SubscriptionId::parse(sub).unwrap())
}

async fn claim(q: &Queue) -> Option<ClaimedJob> {
    match q.claim("test-worker").await.unwrap() {
        Claim::Job(job) => Some(job),
        Claim::Empty { .. } => None,
    }
}

async fn cleanup(q: Queue) {
    q.purge().await.unwrap();
    assert_eq!(q.purge().await.unwrap(), 0, "prefix left keys behind");
}

#[tokio::test]
async fn same_operation_enqueued_twice_is_one_job() {
    let q = queue(Duration::from_secs(10));
    let first = q.enqueue(&create(1, "a")).await.unwrap();
    let second = q.enqueue(&create(1, "a")).await.unwrap();
    assert!(first.created && !second.created);
    assert_eq!(first.id, second.id);
    assert_eq!(q.stats().await.unwrap().ready, 1);
    cleanup(q).await;
}

#[tokio::test]
async fn claim_respects_the_server_limit_and_rotates_over_servers() {
    let q = queue(Duration::from_secs(10));
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
    assert_eq!(
        q.finish(done, &Finish::Done).await.unwrap(),
        FinishResult::Applied
    );
    let next = claim(&q).await.expect("a slot of server 2 is free again");
    assert_eq!(next.server, ServerId(2));
    assert!(claim(&q).await.is_none());
    cleanup(q).await;
}

#[tokio::test]
async fn an_attempt_whose_lease_expired_is_fenced_out() {
    let q = queue(Duration::from_millis(100));
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
        q.finish(&zombie, &Finish::Done).await.unwrap(),
        FinishResult::Fenced
    );
    assert_eq!(
        q.finish(&fresh, &Finish::Done).await.unwrap(),
        FinishResult::Applied
    );
    assert_eq!(q.stats().await.unwrap().done, 1);
    cleanup(q).await;
}

#[tokio::test]
async fn retries_wait_in_the_delayed_set_and_spent_attempts_dead_letter() {
    let q = queue(Duration::from_secs(10));
    q.set_limits(&[(ServerId(1), 1)]).await.unwrap();
    q.enqueue(&create(1, "r")).await.unwrap();
    let mut job = claim(&q).await.unwrap();
    let retry = Finish::Retry {
        delay: Duration::from_millis(50),
        error: "503".into(),
        server_fault: false,
    };
    loop {
        let result = q.finish(&job, &retry).await.unwrap();
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
    let q = queue(Duration::from_secs(10));
    q.enqueue(&create(1, "x")).await.unwrap();
    let job = claim(&q).await.unwrap();
    q.finish(&job, &Finish::Release).await.unwrap();
    let again = claim(&q).await.unwrap();
    assert_eq!(again.attempt, 1);
    cleanup(q).await;
}

#[tokio::test]
async fn the_same_key_with_another_payload_is_refused() {
    let q = queue(Duration::from_secs(10));
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
    q.finish(&job, &Finish::Done).await.unwrap();
    assert!(
        q.enqueue_keyed("order-17", &create(2, "a"))
            .await
            .unwrap()
            .created
    );
    cleanup(q).await;
}

#[tokio::test]
async fn a_failing_server_trips_its_breaker_without_spending_the_others_attempts() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut config = QueueConfig::new(format!("kftest:{}", uuid::Uuid::new_v4().simple()));
    config.breaker_threshold = 2;
    config.breaker_cooldown = Duration::from_millis(300);
    let q = Queue::connect(&url, config).unwrap();
    q.set_limits(&[(ServerId(1), 4), (ServerId(2), 4)])
        .await
        .unwrap();
    for i in 0..4 {
        q.enqueue(&create(1, &format!("bad-{i}"))).await.unwrap();
    }
    q.enqueue(&create(2, "good")).await.unwrap();
    let fail = |job: &ClaimedJob| {
        let _ = job;
        Finish::Retry {
            delay: Duration::from_secs(60),
            error: "503".into(),
            server_fault: true,
        }
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
    for job in taken.iter().filter(|j| j.server == ServerId(1)) {
        q.finish(job, &fail(job)).await.unwrap();
    }
    // Server 1's two other jobs now wait; server 2 is unaffected.
    let mut claimable = vec![];
    while let Some(job) = claim(&q).await {
        claimable.push(job);
    }
    assert!(
        claimable.iter().all(|j| j.server == ServerId(2)),
        "server 1 is paused: {claimable:?}"
    );
    // After the cool-down: half-open, one probe at a time.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let probe = claim(&q).await.expect("a probe job after the cool-down");
    assert_eq!(probe.server, ServerId(1));
    assert_eq!(probe.attempt, 1, "waiting jobs spent no attempts");
    assert!(claim(&q).await.is_none(), "only one probe while half-open");
    // A successful probe closes the breaker: the full limit applies again.
    q.finish(&probe, &Finish::Done).await.unwrap();
    let last = claim(&q).await.expect("closed again");
    assert_eq!(last.server, ServerId(1));
    cleanup(q).await;
}

#[tokio::test]
async fn dead_jobs_are_listed_with_their_reason_and_can_be_replayed() {
    let q = queue(Duration::from_secs(10));
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
