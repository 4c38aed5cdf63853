//! The queue's scripts against a real Redis (REDIS_URL, default 127.0.0.1:6379), one key prefix
//! per test, checked empty afterwards.

use std::time::Duration;

use keyfleet_core::{JobKind, JobPayload, ServerId, SubscriptionId};
use keyfleet_queue::{Claim, ClaimedJob, Finish, FinishResult, Queue, QueueConfig};

fn queue(lease: Duration) -> Queue {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut config = QueueConfig::new(format!("kftest:{}", uuid::Uuid::new_v4().simple()));
    config.lease = lease;
    Queue::connect(&url, config).unwrap()
}

fn create(server: i64, sub: &str) -> JobPayload {
    JobPayload {
        kind: JobKind::CreateKey,
        server: ServerId(server),
        subscription: SubscriptionId::parse(sub).unwrap(),
    }
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
    assert_eq!(q.reap_expired(100).await.unwrap(), 1);
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
