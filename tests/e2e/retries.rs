//! Retries that help (brief, invariant 5): `Retry-After` honoured as the server saw it, permanent
//! errors dead-lettered at once with their reason, a job that kills its workers ends in the dead
//! set after its attempts, dead jobs replay without duplicates, and a failing server trips its
//! circuit breaker instead of burning every job's attempts.

use std::time::Duration;

use keyfleet::producer::Producer;
use keyfleet_core::JobKind;
use keyfleet_fakevpn::{
    DuplicatePolicy, Endpoint, FakeServer, FakeServerConfig, Fault, FaultRates, LoggedRequest,
};
use nix::sys::signal::Signal;

use crate::harness::{
    TestEnv,
    chaos::{dlq_list, key_in_state, log_tail, seed_pending_keys, server_id, spawn_logged_worker},
    eventually,
};

fn count(log: &[LoggedRequest], endpoint: Endpoint) -> usize {
    log.iter().filter(|r| r.endpoint == endpoint).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_is_honoured_as_the_server_saw_it() {
    let env = TestEnv::new().await;
    let fake = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    env.add_server("rl-1", &fake, 2);
    let server = server_id(&env, "rl-1").await;
    fake.inject(
        Some(Endpoint::CreateUser),
        Fault::TooManyRequests {
            retry_after_secs: 2,
        },
        1,
    );
    env.ok(&["provision", "--subscription", "ra-1"]);
    // A 10 ms back-off base: only Retry-After can explain a gap of seconds.
    let (worker, log) = spawn_logged_worker(
        &env,
        2,
        &[
            ("KEYFLEET_RETRY_BASE_MS", "10"),
            ("KEYFLEET_RETRY_CAP_MS", "50"),
        ],
    );
    key_in_state(&env, "ra-1", server, "active", Duration::from_secs(30)).await;

    let requests = fake.meter().log;
    let first_429 = requests
        .iter()
        .position(|r| r.status == 429)
        .unwrap_or_else(|| panic!("the fake answered 429 once: {requests:?}"));
    let limited = requests[first_429];
    assert_eq!(limited.endpoint, Endpoint::CreateUser);
    let next = requests[first_429 + 1..]
        .first()
        .unwrap_or_else(|| panic!("a request followed the 429: {requests:?}"));
    let next_create = requests[first_429 + 1..]
        .iter()
        .find(|r| r.endpoint == Endpoint::CreateUser)
        .copied();
    eprintln!(
        "429 at {} ms; next request ({:?}) at {} ms; next create at {:?} ms",
        limited.at_ms,
        next.endpoint,
        next.at_ms,
        next_create.map(|r| r.at_ms)
    );
    assert!(
        next.at_ms - limited.at_ms >= 2000,
        "the server saw the next request {} ms after its 429 with Retry-After: 2 ({requests:?})\n{}",
        next.at_ms - limited.at_ms,
        log_tail(&log, 30)
    );
    if let Some(create) = next_create {
        assert!(create.at_ms - limited.at_ms >= 2000, "{requests:?}");
    }
    let meter = fake.meter();
    assert_eq!(fake.users().len(), 1, "one key on the server");
    assert_eq!((meter.creates_committed, meter.duplicates), (1, 0));
    let stats = env.queue.stats().await.unwrap();
    assert_eq!((stats.dead, stats.done), (0, 1));
    drop(worker);
    fake.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_is_dead_lettered_on_the_first_attempt_with_its_reason() {
    let env = TestEnv::new().await;
    let fake = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    let url = fake.api_url();
    env.ok(&[
        "server",
        "add",
        "--name",
        "bad-key",
        "--kind",
        "v2ray",
        "--api-url",
        &url,
        "--api-key",
        "not-the-panel-key",
    ]);
    let server = server_id(&env, "bad-key").await;
    env.ok(&["provision", "--subscription", "auth-1"]);
    let (worker, log) = spawn_logged_worker(&env, 2, &[("KEYFLEET_RETRY_BASE_MS", "10")]);
    let dead = eventually(
        Duration::from_secs(30),
        "the job in the dead set",
        || async {
            let dead = dlq_list(&env);
            (!dead.is_empty()).then_some(dead)
        },
    )
    .await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let job = &dead[0];
    assert_eq!(job["attempts"], 1, "dead on the first attempt: {job}");
    assert_eq!(job["kind"], "create_key");
    assert_eq!(job["server"], server.0);
    assert_eq!(job["server_name"], "bad-key");
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains("401") || error.to_lowercase().contains("api key"),
        "the reason names the cause: {error}"
    );
    assert!(
        !error.contains("not-the-panel-key"),
        "no secret in the reason: {error}"
    );
    let row = key_in_state(&env, "auth-1", server, "failed", Duration::from_secs(10)).await;
    let last_error = row.last_error.expect("the key row has the reason");
    assert!(
        last_error.contains("401") || last_error.to_lowercase().contains("api key"),
        "{last_error}"
    );
    let meter = fake.meter();
    assert_eq!(
        meter.total_requests,
        1,
        "exactly one request reached the server: {:?}\n{}",
        meter.log,
        log_tail(&log, 20)
    );
    assert_eq!(meter.log[0].status, 401);
    let stats = env.queue.stats().await.unwrap();
    assert_eq!((stats.ready, stats.delayed, stats.running), (0, 0, 0));
    worker.signal(Signal::SIGKILL);
    fake.shutdown().await;
    env.cleanup().await;
}

/// A job whose attempts always take their worker down (emulated: the create hangs and the test
/// SIGKILLs the worker while it is in flight). Attempts are counted at claim, so the reaper of the
/// next worker buries it after `max_attempts` instead of letting it loop forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_job_that_kills_its_workers_ends_in_the_dead_set() {
    let env = TestEnv::new().await;
    let poison = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    let healthy = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    env.add_server("poison", &poison, 1);
    env.add_server("healthy", &healthy, 4);
    let (poison_id, healthy_id) = (
        server_id(&env, "poison").await,
        server_id(&env, "healthy").await,
    );
    let max = JobKind::CreateKey.max_attempts();
    poison.inject(
        Some(Endpoint::CreateUser),
        Fault::Hang(Duration::from_secs(120)),
        max * 3,
    );
    let mut jobs = seed_pending_keys(&env, "poison-", 1, &[poison_id]).await;
    jobs.extend(seed_pending_keys(&env, "before-", 10, &[healthy_id]).await);
    env.queue.enqueue_all(&jobs).await.unwrap();

    let knobs = [
        ("KEYFLEET_LEASE_MS", "600"),
        ("KEYFLEET_RETRY_BASE_MS", "10"),
    ];
    for kill in 1..=max {
        let (worker, _log) = spawn_logged_worker(&env, 4, &knobs);
        // The poison job's create is in flight and it is the only job running: the crash takes
        // down nothing else (a crash would cost every job it interrupts an attempt).
        eventually(
            Duration::from_secs(20),
            &format!("create attempt {kill} in flight at the poison server, alone"),
            || async {
                let creates = count(&poison.meter().log, Endpoint::CreateUser);
                assert!(creates <= kill as usize, "more creates than claims");
                let running = env.queue.stats().await.ok()?.running;
                (creates == kill as usize && running == 1).then_some(())
            },
        )
        .await;
        worker.signal(Signal::SIGKILL);
        drop(worker);
        if kill == max / 2 {
            // Work that arrives while the poison job cycles is not held up by it.
            let more = seed_pending_keys(&env, "during-", 10, &[healthy_id]).await;
            env.queue.enqueue_all(&more).await.unwrap();
        }
    }
    // One more worker: its reaper finds the last attempt's lease expired with attempts spent.
    let (last, last_log) = spawn_logged_worker(&env, 4, &knobs);
    let dead = eventually(
        Duration::from_secs(20),
        "the poison job in the dead set",
        || async {
            let dead = dlq_list(&env);
            (!dead.is_empty()).then_some(dead)
        },
    )
    .await;
    assert_eq!(dead.len(), 1, "only the poison job is dead: {dead:?}");
    let job = &dead[0];
    assert_eq!(job["server_name"], "poison");
    assert_eq!(job["attempts"], max, "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains("lost its lease") && error.contains(&format!("{max} attempts")),
        "the reason says the workers died holding it: {error}"
    );
    let requests_when_dead = poison.meter().total_requests;
    let row = env
        .store
        .key_row(&"poison-0".parse().unwrap(), poison_id)
        .await
        .unwrap()
        .unwrap();
    eprintln!(
        "poison key row after the reaper buried its job: state {:?}, last_error {:?}",
        row.state, row.last_error
    );

    // Healthy work before, during and after the poison job's cycle all completes.
    let after = seed_pending_keys(&env, "after-", 10, &[healthy_id]).await;
    env.queue.enqueue_all(&after).await.unwrap();
    eventually(
        Duration::from_secs(30),
        "every healthy key active",
        || async {
            let n = env.store.count_keys_in_state("active").await.ok()?;
            (n == 30).then_some(())
        },
    )
    .await;
    let stats = env.queue.stats().await.unwrap();
    assert_eq!(
        (stats.ready, stats.running, stats.delayed, stats.dead),
        (0, 0, 0, 1),
        "nothing of the poison job is left to claim"
    );
    let meter = poison.meter();
    assert_eq!(
        count(&meter.log, Endpoint::CreateUser),
        max as usize,
        "one create per attempt, none after it died: {:?}\n{}",
        meter.log,
        log_tail(&last_log, 30)
    );
    assert_eq!(
        meter.total_requests, requests_when_dead,
        "no request for the dead job reached the server"
    );
    let h = healthy.meter();
    assert_eq!((h.creates_committed, h.duplicates), (30, 0));
    assert_eq!(healthy.users().len(), 30);
    drop(last);
    poison.shutdown().await;
    healthy.shutdown().await;
    env.cleanup().await;
}

/// A permanent error that an operator can fix: the create committed on the panel but its response
/// did not decode. The job dies at once; replaying it (by id, by server, all) runs it again, and the
/// new attempt adopts the user the first one made instead of creating a second.
async fn replay_adopts_what_the_dead_attempt_created(policy: DuplicatePolicy) {
    let env = TestEnv::new().await;
    let config = FakeServerConfig::v2ray().with_duplicate_policy(policy);
    let mut fakes = vec![];
    let mut ids = vec![];
    for name in ["rp-a", "rp-b", "rp-c"] {
        let fake = FakeServer::start(config.clone()).await.unwrap();
        env.add_server(name, &fake, 2);
        fake.inject(Some(Endpoint::CreateUser), Fault::MalformedBody, 1);
        ids.push(server_id(&env, name).await);
        fakes.push(fake);
    }
    env.ok(&["provision", "--subscription", "rp-1"]);
    let (worker, log) = spawn_logged_worker(&env, 4, &[("KEYFLEET_RETRY_BASE_MS", "10")]);
    let dead = eventually(Duration::from_secs(30), "three dead jobs", || async {
        let dead = dlq_list(&env);
        (dead.len() == 3).then_some(dead)
    })
    .await;
    let (exit, _) = worker.terminate(Duration::from_secs(20));
    assert!(exit.success(), "{}", log_tail(&log, 30));
    for job in &dead {
        assert_eq!(job["attempts"], 1, "a decode error is permanent: {job}");
        assert!(
            job["error"].as_str().unwrap().contains("decode"),
            "the reason: {job}"
        );
    }
    for (fake, &server) in fakes.iter().zip(&ids) {
        assert_eq!(fake.users().len(), 1, "the dead attempt's create committed");
        let row = key_in_state(&env, "rp-1", server, "failed", Duration::from_secs(5)).await;
        assert!(row.last_error.is_some());
    }
    let job_on = |server: keyfleet_core::ServerId| {
        dead.iter()
            .find(|j| j["server"] == server.0)
            .unwrap()
            .clone()
    };

    // Not dead: refused, and nothing changes.
    let out = env.run(&["dlq", "replay", "--id", "999999"]);
    assert!(!out.status.success(), "replaying an unknown id fails");
    assert_eq!(dlq_list(&env).len(), 3);

    // By id: only that job leaves the dead set; its key goes back to pending, the error visible.
    let a = job_on(ids[0])["id"].as_u64().unwrap().to_string();
    env.ok(&["dlq", "replay", "--id", &a]);
    let left = dlq_list(&env);
    assert_eq!(left.len(), 2);
    assert!(left.iter().all(|j| j["server"] != ids[0].0), "{left:?}");
    let row = key_in_state(&env, "rp-1", ids[0], "pending", Duration::from_secs(5)).await;
    assert!(row.last_error.is_some(), "the last error stays visible");
    key_in_state(&env, "rp-1", ids[1], "failed", Duration::from_secs(5)).await;

    // By server.
    env.ok(&["dlq", "replay", "--server", "rp-b"]);
    let left = dlq_list(&env);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["server_name"], "rp-c");
    key_in_state(&env, "rp-1", ids[1], "pending", Duration::from_secs(5)).await;
    key_in_state(&env, "rp-1", ids[2], "failed", Duration::from_secs(5)).await;

    // All.
    env.ok(&["dlq", "replay", "--all"]);
    assert!(dlq_list(&env).is_empty());
    key_in_state(&env, "rp-1", ids[2], "pending", Duration::from_secs(5)).await;

    let (worker, log) = spawn_logged_worker(&env, 4, &[("KEYFLEET_RETRY_BASE_MS", "10")]);
    for &server in &ids {
        key_in_state(&env, "rp-1", server, "active", Duration::from_secs(30)).await;
    }
    assert!(dlq_list(&env).is_empty());
    let status = env
        .store
        .subscription_status(&"rp-1".parse().unwrap())
        .await
        .unwrap();
    let stats = env.queue.stats().await.unwrap();
    // What the servers hold, gathered before cleaning up so a failure leaks no database.
    let held: Vec<_> = fakes
        .iter()
        .zip(&status)
        .map(|(fake, key)| (fake.users(), fake.meter(), key.server_key_id.clone()))
        .collect();
    let tail = log_tail(&log, 30);
    drop(worker);
    for fake in fakes {
        fake.shutdown().await;
    }
    env.cleanup().await;
    assert_eq!((stats.dead, stats.done), (0, 3));
    for (users, meter, server_key_id) in held {
        assert_eq!(
            (users.len(), meter.duplicates),
            (1, 0),
            "the replay adopted the user the dead attempt created ({policy:?}): {:?}\n{tail}",
            meter.log,
        );
        assert_eq!(server_key_id.as_deref(), Some(users[0].id.as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_dead_jobs_run_again_and_adopt_instead_of_duplicating() {
    replay_adopts_what_the_dead_attempt_created(DuplicatePolicy::Conflict409).await;
}

/// The same on a panel that does not answer 409 for an existing email but silently stores a
/// second user (the brief's "409 ... and its absence"): the replay must look before it creates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_does_not_duplicate_on_a_panel_without_409() {
    replay_adopts_what_the_dead_attempt_created(DuplicatePolicy::SilentDuplicate).await;
}

/// A server that fails everything opens its breaker after `threshold` failures; while it is open
/// its jobs wait without spending attempts and only half-open probes reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_server_trips_its_breaker_instead_of_burning_every_attempt() {
    let env = TestEnv::new().await;
    let fake = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    env.add_server("flaky", &fake, 4);
    fake.set_fault_rates(FaultRates {
        status_5xx: 1.0,
        ..FaultRates::default()
    });
    let producer = Producer::new(env.store.clone(), env.queue.clone());
    const JOBS: usize = 20;
    for i in 0..JOBS {
        producer
            .provision(&format!("br-{i}").parse().unwrap(), None)
            .await
            .unwrap();
    }
    // Back-off of at most 50 ms: without a breaker every job would spend its 8 attempts within a
    // second or two of outage and be dead-lettered.
    let (worker, log) = spawn_logged_worker(
        &env,
        8,
        &[
            ("KEYFLEET_BREAKER_THRESHOLD", "3"),
            ("KEYFLEET_BREAKER_COOLDOWN_MS", "1500"),
            ("KEYFLEET_RETRY_BASE_MS", "10"),
            ("KEYFLEET_RETRY_CAP_MS", "50"),
        ],
    );
    eventually(Duration::from_secs(20), "the outage to be hit", || async {
        (fake.meter().total_requests > 0).then_some(())
    })
    .await;
    // The outage lasts 6 s (scenario time, not synchronisation): 4 cool-downs.
    let outage = Duration::from_secs(6);
    tokio::time::sleep(outage).await;
    let stats = env.queue.stats().await.unwrap();
    assert_eq!(stats.dead, 0, "the outage dead-lettered nothing");
    fake.clear_faults();
    let during = fake.meter();
    let failed: Vec<&LoggedRequest> = during.log.iter().filter(|r| r.status >= 500).collect();
    let span = failed.last().unwrap().at_ms - failed[0].at_ms;
    eprintln!(
        "breaker: {} requests failed with 5xx over {span} ms of outage ({JOBS} jobs, max in flight 4, threshold 3, cool-down 1500 ms): {:?}",
        failed.len(),
        failed.iter().map(|r| r.at_ms).collect::<Vec<_>>()
    );
    // threshold + what was already in flight when it opened + one probe per cool-down.
    let bound = 3 + 4 + (outage.as_millis() / 1500) as usize + 2;
    assert!(
        failed.len() <= bound,
        "{} requests reached the failing server, expected at most {bound} (without a breaker: up to {})\n{}",
        failed.len(),
        JOBS * JobKind::CreateKey.max_attempts() as usize,
        log_tail(&log, 40)
    );
    assert!(
        failed.len() >= 3 + 2,
        "the breaker probed the server while open"
    );

    eventually(Duration::from_secs(30), "all keys active", || async {
        let n = env.store.count_keys_in_state("active").await.ok()?;
        (n == JOBS as i64).then_some(())
    })
    .await;
    let stats = env.queue.stats().await.unwrap();
    assert_eq!((stats.dead, stats.done), (0, JOBS as u64));
    let meter = fake.meter();
    assert_eq!(fake.users().len(), JOBS);
    assert_eq!(
        (meter.creates_committed, meter.duplicates),
        (JOBS as u64, 0)
    );
    drop(worker);
    fake.shutdown().await;
    env.cleanup().await;
}
