//! Queue throughput: keyfleet's queue backend against two peers, run interleaved (keyfleet,
//! apalis-redis, BullMQ, keyfleet, apalis-redis, BullMQ, ...) so that the noise of a shared machine
//! hits all alike. Reported: the median of the runs, the ratio keyfleet / peer of the medians and the
//! median of the per-round ratios (run i of keyfleet against run i of the peer, right after it).
//! - stock apalis-redis 1.0.0 with its defaults, in this process;
//! - BullMQ (Node.js; version pinned in `benches/bullmq/package.json`, the whole tree in its
//!   `package-lock.json`), with its defaults: `benches/bullmq/bench.cjs`, one `node` process per
//!   run, one `Worker` of the same concurrency. The bench installs it with `npm ci --ignore-scripts`
//!   into `target/tmp/queue-bench/bullmq` (fast when npm's cache has it; needs the npm registry the
//!   first time) and fails, naming what is missing, if `node`, `npm` or the registry is not there.
//!
//! Run: `cargo bench -p keyfleet --bench queue` (the first step of `just bench`). Needs
//! `redis-server`, `node` and `npm` on PATH (`.ci/services.sh` installs redis-server; `REDIS_URL`
//! is not read). The bench starts **two Redis servers of its own** on free loopback ports, from the
//! same `redis-server` binary with the same settings (no persistence, as `.ci/services.sh` runs the
//! shared one): one for keyfleet and apalis-redis, one for BullMQ, so that each system's "Redis
//! CPU" is its own and no other client of the shared Redis on 6379 (tests, other benches) runs in
//! the same server. Both are stopped when the bench ends, fails or is interrupted (Ctrl-C). Knobs:
//! `KF_BENCH_JOBS` (jobs per run, default 7,500: stock apalis-redis cannot start on a backlog of
//! 8,000 due jobs, which the last step shows), `KF_BENCH_RUNS` (measured runs per system and
//! scenario, default 5).
//!
//! Every system gets one unmeasured warm-up per scenario: keyfleet and apalis-redis a run in this
//! process before the measured ones; BullMQ, a new `node` process per run, drains a warm-up backlog
//! in that process before its measured one (JIT and HTTP connections warm, as a long-running worker
//! has them).
//!
//! Scenarios, each for every system. keyfleet runs as `keyfleet worker` does: one claim loop
//! (apalis worker over its queue backend) per 8 of concurrency (`claim_loops`); apalis-redis runs
//! one worker, BullMQ one `Worker`.
//! - (a) no-op jobs: N jobs enqueued up front, then concurrency 64 drains them.
//!   keyfleet: `JobPayload`s over 11 servers with per-server limits of 64 (on, not binding); the
//!   handler acknowledges with `Handoff::finish(Done)` as the worker's executor does (lease, fence
//!   check, per-server slot, idempotency key: every guarantee on; the same call claims the next
//!   job for the claim loops), lease heartbeats and the reaper run beside it.
//!   apalis-redis: `RedisStorage` with `Config::default()` (only the queue name is ours), the same
//!   `JobPayload`s, a no-op handler; apalis acknowledges. BullMQ: the same payloads as job data
//!   (`Queue.addBulk`), an async no-op processor; BullMQ acknowledges (`moveToFinished`, which also
//!   fetches the worker's next job in the same script). Diagnostic rows run keyfleet with a single
//!   claim loop, to show what one claim in flight at a time costs, and with claim and finish as
//!   separate script calls (`Queue::finish`, no hand-over: keyfleet before issue 8's change), to
//!   show what the hand-over gains in the same run.
//! - (b) HTTP: each job is one GET to a fake V2Ray panel with 0 ms latency, jobs round-robin over
//!   11 servers. keyfleet: per-server limit 4, worker concurrency 44. apalis-redis and BullMQ:
//!   concurrency 44 and no per-server limit (apalis-redis has none; BullMQ's per-group limits are
//!   BullMQ Pro, its free edition only has a queue-wide concurrency and rate limit), so they may put
//!   more requests in flight on one server. BullMQ's handler uses Node's `http` with one keep-alive
//!   agent per server, as the Rust side holds one pooled `reqwest::Client` per server.
//! - (c) as (b), but 10 ms per request and the backlog enqueued server by server (as a sweep of
//!   one server after another would), so that a per-server limit actually binds.
//!
//! The peak requests in flight per fake server (its meter) are reported for (b) and (c).
//!
//! The clock runs from the worker's start until every job is acknowledged in Redis: for keyfleet
//! that is the moment the last `finish` returns (the handler acknowledges); for apalis-redis, whose
//! persistence layer acknowledges after the handler in batches and flushes the last batch when the
//! worker stops, it is the moment the worker returns; for BullMQ (connected and its scripts loaded
//! before the clock starts) the last `completed` event, which fires once `moveToFinished` returned.
//! Enqueueing and Node's start are not timed. "Redis CPU" is the Redis server's CPU time over the
//! same window divided by the jobs.

mod common;

use std::{
    future::Future,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use apalis_core::{
    backend::TaskSink, error::BoxDynError, task::data::Data, worker::builder::WorkerBuilder,
};
use apalis_redis::{Config as ApalisConfig, RedisStorage};
use keyfleet::worker::claim_loops;

use crate::common::{load_average, process_cpu};
use keyfleet_core::{JobPayload, ServerId, SubscriptionId};
use keyfleet_fakevpn::{FakeFleet, FakeServerConfig, Latency};
use keyfleet_queue::{
    Claim, ClaimHooks, ClaimedJob, Finish, FinishResult, Handoff, LeaseRegistry, Queue,
    QueueBackend, QueueConfig, WakeSignal, spawn_maintenance,
};
use tokio::sync::watch;
use tower::limit::ConcurrencyLimitLayer;
use uuid::Uuid;

const SERVERS: usize = 11;
/// What the peak table says of BullMQ's per-server limit.
const BULLMQ_LIMIT: &str = "none (groups are BullMQ Pro)";
/// Scenario (a): worker concurrency, and keyfleet's per-server limit (on, but not binding).
const NOOP_CONCURRENCY: usize = 64;
const NOOP_LIMIT: u32 = 64;
/// Scenarios (b) and (c): keyfleet's per-server limit; both systems run 11 × 4 jobs at once.
const HTTP_LIMIT: u32 = 4;
/// Scenario (a), a diagnostic row: keyfleet as it was before a finish claimed the next job.
const NO_HANDOFF: &str = "keyfleet, claim and finish apart";
const HTTP_CONCURRENCY: usize = SERVERS * HTTP_LIMIT as usize;
/// Stock apalis-redis 1.0.0 promotes every due job with one `unpack` in Lua: at 8,000 it fails.
const APALIS_BACKLOG_PROBE: usize = 8_000;
/// Scenario (c): per-request latency and backlog, enqueued server by server.
const SKEWED_LATENCY: Duration = Duration::from_millis(10);
const SKEWED_JOBS: usize = 2_200;
const DEFAULT_JOBS: usize = 7_500;
const DEFAULT_RUNS: usize = 5;
const ENQUEUE_CHUNK: usize = 1_000;
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// BullMQ's side, kept in the repository; installed and run under `target/tmp/queue-bench`.
const BULLMQ_SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/bullmq");
const BULLMQ_FILES: [&str; 3] = ["package.json", "package-lock.json", "bench.cjs"];
const NPM_TIMEOUT: Duration = Duration::from_secs(300);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // On Ctrl-C the bench's future is dropped, and with it its Redis servers and `node` (killed on
    // drop), so none is left running.
    tokio::select! {
        result = bench() => result,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; the bench's Redis servers are stopped"),
    }
}

async fn bench() -> anyhow::Result<()> {
    let jobs_n = env_usize("KF_BENCH_JOBS", DEFAULT_JOBS)?;
    let runs = env_usize("KF_BENCH_RUNS", DEFAULT_RUNS)?;
    ensure!(
        (SERVERS..APALIS_BACKLOG_PROBE).contains(&jobs_n) && runs >= 1,
        "use 11 <= KF_BENCH_JOBS < {APALIS_BACKLOG_PROBE} (stock apalis-redis cannot start on a \
         backlog of {APALIS_BACKLOG_PROBE} due jobs) and KF_BENCH_RUNS >= 1"
    );
    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("queue-bench");
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    let bullmq = Bullmq::install(&work.join("bullmq")).await?;
    let redis = RedisServer::start(&work, "keyfleet").await?;
    let bullmq_redis = RedisServer::start(&work, "bullmq").await?;
    let jobs = payloads(jobs_n);
    let warmup = payloads((jobs_n / 10).max(SERVERS));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());

    println!("# keyfleet queue benchmark");
    println!(
        "{jobs_n} jobs per run over {SERVERS} servers, {runs} measured runs per system and \
         scenario (after one unmeasured warm-up each), interleaved; {cores} cores."
    );
    println!(
        "Redis {} twice, private: keyfleet and apalis-redis on port {}, BullMQ on port {}; \
         BullMQ {} on Node.js {}.",
        redis_version(&redis.url).await?,
        redis.port,
        bullmq_redis.port,
        bullmq.version,
        bullmq.node
    );
    println!("Load average at the start: {}.", load_average());
    println!();

    let mut table = Vec::new();

    // (a) No-op jobs.
    println!("## (a) no-op jobs, one worker, concurrency {NOOP_CONCURRENCY}");
    let url = redis.url.as_str();
    let bull = (&bullmq, &bullmq_redis);
    run_keyfleet(
        url,
        &warmup,
        NOOP_LIMIT,
        NOOP_CONCURRENCY,
        Shape::worker(NOOP_CONCURRENCY),
        None,
    )
    .await
    .context("keyfleet warm-up")?;
    run_apalis(url, &warmup, NOOP_CONCURRENCY, None)
        .await
        .context("apalis-redis warm-up")?;
    let (mut kf, mut ap, mut bm) = (Vec::new(), Vec::new(), Vec::new());
    let (mut kf2, mut kf_apart) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        let sample = run_keyfleet(
            url,
            &jobs,
            NOOP_LIMIT,
            NOOP_CONCURRENCY,
            Shape::worker(NOOP_CONCURRENCY),
            None,
        )
        .await?;
        kf.push(report("keyfleet", run, runs, sample));
        let sample = run_apalis(url, &jobs, NOOP_CONCURRENCY, None).await?;
        ap.push(report("apalis-redis", run, runs, sample));
        let sample = run_bullmq(bull, &jobs, &warmup, NOOP_CONCURRENCY, None).await?;
        bm.push(report("BullMQ", run, runs, sample));
        let one_loop = Shape {
            claim_loops: 1,
            hand_off: true,
        };
        let sample = run_keyfleet(url, &jobs, NOOP_LIMIT, NOOP_CONCURRENCY, one_loop, None).await?;
        kf2.push(report("keyfleet, 1 claim loop", run, runs, sample));
        let apart = Shape {
            hand_off: false,
            ..Shape::worker(NOOP_CONCURRENCY)
        };
        let sample = run_keyfleet(url, &jobs, NOOP_LIMIT, NOOP_CONCURRENCY, apart, None).await?;
        kf_apart.push(report(NO_HANDOFF, run, runs, sample));
    }
    let bullmq_name = format!("BullMQ {}", bullmq.version);
    table.extend(Row::compare(
        "(a) no-op",
        &kf,
        [("apalis-redis 1.0.0", &ap), (&bullmq_name, &bm)],
    ));
    table.push(Row::single(
        "(a) no-op, diagnostic",
        "keyfleet, 1 claim loop",
        &kf2,
    ));
    table.push(Row::single("(a) no-op, diagnostic", NO_HANDOFF, &kf_apart));
    println!();

    // Diagnostics: what each script costs, compared with a bare Redis round trip.
    let ping = ping_round_trip(url, 2_000).await?;
    let costs = script_costs(url, 2_000).await?;

    // (b) HTTP jobs against the fake fleet, spread round-robin.
    println!(
        "## (b) one HTTP GET per job to 11 fake V2Ray panels (0 ms), jobs round-robin over the \
         servers, concurrency {HTTP_CONCURRENCY}"
    );
    let (kf_http, ap_http, bm_http) =
        http_scenario(url, bull, Latency::Zero, &jobs, &warmup, runs).await?;
    table.extend(Row::compare(
        "(b) HTTP, 0 ms",
        &kf_http,
        [("apalis-redis 1.0.0", &ap_http), (&bullmq_name, &bm_http)],
    ));
    println!();

    // (c) Where the per-server limit binds: slower servers, and the backlog enqueued server by
    // server, as a sweep of one server after another would.
    let skewed_runs = runs.min(3);
    println!(
        "## (c) as (b), but {} ms per request and {SKEWED_JOBS} jobs enqueued server by server",
        SKEWED_LATENCY.as_millis()
    );
    let (kf_skew, ap_skew, bm_skew) = http_scenario(
        url,
        bull,
        Latency::Fixed(SKEWED_LATENCY),
        &payloads_by_server(SKEWED_JOBS),
        &payloads_by_server(SKEWED_JOBS / 10),
        skewed_runs,
    )
    .await?;
    table.extend(Row::compare(
        "(c) HTTP, 10 ms, by server",
        &kf_skew,
        [("apalis-redis 1.0.0", &ap_skew), (&bullmq_name, &bm_skew)],
    ));
    println!();

    // The backlog apalis-redis cannot take.
    println!("## apalis-redis with {APALIS_BACKLOG_PROBE} due jobs");
    let probe = match run_apalis(url, &payloads(APALIS_BACKLOG_PROBE), NOOP_CONCURRENCY, None).await
    {
        Ok(sample) => format!(
            "drained them ({:.0} jobs/s): no crash observed",
            sample.jobs_per_sec()
        ),
        Err(error) => format!("failed: {error:#}"),
    };
    println!("{probe}");
    println!();

    println!("## Results");
    println!();
    println!(
        "| scenario | system | runs | median jobs/s | min - max jobs/s | keyfleet / this system \
         (median of pairs) | Redis CPU us/job |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for row in &table {
        row.print();
    }
    println!();
    println!(
        "Peak requests in flight per fake server (the fake's meter), highest over the measured runs:"
    );
    println!();
    println!("| scenario | system | per-server limit | servers 1..11 | max |");
    println!("|---|---|---|---|---:|");
    for (scenario, system, limit, samples) in [
        ("(b)", "keyfleet", HTTP_LIMIT.to_string(), &kf_http),
        (
            "(b)",
            "apalis-redis",
            "none (not available)".to_owned(),
            &ap_http,
        ),
        ("(b)", "BullMQ", BULLMQ_LIMIT.to_owned(), &bm_http),
        ("(c)", "keyfleet", HTTP_LIMIT.to_string(), &kf_skew),
        (
            "(c)",
            "apalis-redis",
            "none (not available)".to_owned(),
            &ap_skew,
        ),
        ("(c)", "BullMQ", BULLMQ_LIMIT.to_owned(), &bm_skew),
    ] {
        let peaks = peak_per_server(samples);
        let max = peaks.iter().copied().max().unwrap_or(0);
        let list = peaks
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(" ");
        println!("| {scenario} | {system} | {limit} | {list} | {max} |");
    }
    println!();
    println!("Diagnostics:");
    println!(
        "- one at a time, idle: Redis PING round trip {:.0} us; keyfleet enqueue {:.0} us round \
         trip / {:.0} us inside Redis, claim {:.0} / {:.0} us, finish {:.0} / {:.0} us. A claimer \
         that waits for each claim reply gets at most {:.0} claims/s",
        micros(ping),
        micros(costs.enqueue.0),
        micros(costs.enqueue.1),
        micros(costs.claim.0),
        micros(costs.claim.1),
        micros(costs.finish.0),
        micros(costs.finish.1),
        1.0 / costs.claim.0.as_secs_f64()
    );
    println!(
        "- (a) per job, medians: keyfleet {:.0} us of wall time ({:.0} us with 1 claim loop), \
         apalis-redis {:.0} us, BullMQ {:.0} us; apalis-redis fetches 10 jobs per round trip \
         (default batch_size), BullMQ's acknowledgement script hands the worker its next job",
        1e6 / median(&kf),
        1e6 / median(&kf2),
        1e6 / median(&ap),
        1e6 / median(&bm)
    );
    let client_cpu =
        |samples: &[Sample]| median_of(samples.iter().map(Sample::client_cpu_per_job).collect());
    println!(
        "- (a) CPU of the worker's process per job (user + system, all threads; medians): \
         keyfleet {:.0} us, apalis-redis {:.0} us, BullMQ {:.0} us (node, one JavaScript thread); \
         Redis CPU per job is in the table",
        client_cpu(&kf),
        client_cpu(&ap),
        client_cpu(&bm)
    );
    let calls =
        |samples: &[Sample]| median_of(samples.iter().map(Sample::script_calls_per_job).collect());
    println!(
        "- (a) Redis script calls (EVALSHA, EVAL) per job, medians: keyfleet {:.2}, apalis-redis \
         {:.2}, BullMQ {:.2}",
        calls(&kf),
        calls(&ap),
        calls(&bm)
    );
    println!(
        "- worker stop after the last acknowledgement (median): keyfleet {:.0} ms, apalis-redis \
         {:.0} ms, BullMQ {:.0} ms (not in the figures above)",
        median_stop_ms(&kf),
        median_stop_ms(&ap),
        median_stop_ms(&bm)
    );
    println!("- apalis-redis with {APALIS_BACKLOG_PROBE} due jobs: {probe}");
    println!("- load average at the end: {}", load_average());
    Ok(())
}

/// The jobs: create-key jobs spread round-robin over servers 1..=11, unique per index.
fn payloads(n: usize) -> Vec<JobPayload> {
    (0..n)
        .map(|i| {
            JobPayload::create(
                ServerId((i % SERVERS) as i64 + 1),
                SubscriptionId::parse(&format!("bench-{i}")).expect("a valid id"),
            )
        })
        .collect()
}

/// The same jobs, enqueued server by server: all of server 1's, then all of server 2's, ...
fn payloads_by_server(n: usize) -> Vec<JobPayload> {
    let mut jobs = payloads(n);
    jobs.sort_by_key(|job| job.server());
    jobs
}

/// Starts 11 fake V2Ray panels with `latency`, then runs every system against them: one
/// unmeasured warm-up each, then `runs` interleaved measured runs.
async fn http_scenario(
    url: &str,
    bull: (&Bullmq, &RedisServer),
    latency: Latency,
    jobs: &[JobPayload],
    warmup: &[JobPayload],
    runs: usize,
) -> anyhow::Result<(Vec<Sample>, Vec<Sample>, Vec<Sample>)> {
    let fleet = FakeFleet::start(SERVERS, 0, |_, _| {
        FakeServerConfig::v2ray().with_latency(latency.clone())
    })
    .await
    .context("start the fake fleet")?;
    let http = Arc::new(Http::new(&fleet)?);
    let with_fleet = || Some((http.clone(), &fleet));
    run_keyfleet(
        url,
        warmup,
        HTTP_LIMIT,
        HTTP_CONCURRENCY,
        Shape::worker(HTTP_CONCURRENCY),
        with_fleet(),
    )
    .await
    .context("keyfleet warm-up")?;
    run_apalis(url, warmup, HTTP_CONCURRENCY, with_fleet())
        .await
        .context("apalis-redis warm-up")?;
    let (mut kf, mut ap, mut bm) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=runs {
        let sample = run_keyfleet(
            url,
            jobs,
            HTTP_LIMIT,
            HTTP_CONCURRENCY,
            Shape::worker(HTTP_CONCURRENCY),
            with_fleet(),
        )
        .await?;
        kf.push(report("keyfleet", run, runs, sample));
        let sample = run_apalis(url, jobs, HTTP_CONCURRENCY, with_fleet()).await?;
        ap.push(report("apalis-redis", run, runs, sample));
        let sample = run_bullmq(bull, jobs, warmup, HTTP_CONCURRENCY, with_fleet()).await?;
        bm.push(report("BullMQ", run, runs, sample));
    }
    fleet.shutdown().await;
    Ok((kf, ap, bm))
}

/// One measured run.
struct Sample {
    jobs: usize,
    elapsed: Duration,
    /// From the last acknowledgement until the worker returned.
    stop: Duration,
    /// Scenario (b): `peak_in_flight` of each fake server during the run.
    peaks: Vec<u64>,
    /// CPU time the Redis server used from the worker's start until it returned.
    redis_cpu: Duration,
    /// CPU time of the worker's process over the same window (user + system, all threads): this
    /// process for keyfleet and apalis-redis (with the fake fleet in it in (b) and (c)), the
    /// `node` process for BullMQ (without the fakes).
    client_cpu: Duration,
    /// Script calls (EVALSHA, EVAL) Redis ran over the same window: the worker's and the
    /// maintenance's (keyfleet: lease heartbeats, the reaper).
    script_calls: u64,
}

impl Sample {
    fn jobs_per_sec(&self) -> f64 {
        self.jobs as f64 / self.elapsed.as_secs_f64()
    }

    fn redis_cpu_per_job(&self) -> f64 {
        micros(self.redis_cpu) / self.jobs as f64
    }

    fn client_cpu_per_job(&self) -> f64 {
        micros(self.client_cpu) / self.jobs as f64
    }

    fn script_calls_per_job(&self) -> f64 {
        self.script_calls as f64 / self.jobs as f64
    }
}

/// The Redis server's CPU time (user + system) so far, from `INFO cpu`.
struct RedisCpu(redis::aio::MultiplexedConnection);

impl RedisCpu {
    async fn connect(redis_url: &str) -> anyhow::Result<Self> {
        let conn = redis::Client::open(redis_url)?
            .get_multiplexed_async_connection()
            .await?;
        Ok(Self(conn))
    }

    async fn now(&mut self) -> anyhow::Result<f64> {
        let info: String = redis::cmd("INFO")
            .arg("cpu")
            .query_async(&mut self.0)
            .await?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Ok(field("used_cpu_user:") + field("used_cpu_sys:"))
    }

    /// Script calls (EVALSHA and EVAL) the server has run so far, from `INFO commandstats`.
    async fn script_calls(&mut self) -> anyhow::Result<u64> {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.0)
            .await?;
        Ok(info
            .lines()
            .filter_map(|l| {
                l.strip_prefix("cmdstat_evalsha:")
                    .or_else(|| l.strip_prefix("cmdstat_eval:"))
            })
            .filter_map(|l| l.split(',').find_map(|f| f.strip_prefix("calls=")))
            .filter_map(|v| v.parse::<u64>().ok())
            .sum())
    }
}

fn report(system: &str, run: usize, runs: usize, sample: Sample) -> Sample {
    let peaks = if sample.peaks.is_empty() {
        String::new()
    } else {
        let max = sample.peaks.iter().max().copied().unwrap_or(0);
        format!(", peak in flight per server <= {max}")
    };
    println!(
        "{system:>26} run {run}/{runs}: {} jobs in {:.3} s = {:>6.0} jobs/s, Redis CPU {:.0} us/job \
         (worker stop +{} ms){peaks}",
        sample.jobs,
        sample.elapsed.as_secs_f64(),
        sample.jobs_per_sec(),
        sample.redis_cpu_per_job(),
        sample.stop.as_millis()
    );
    sample
}

struct Row {
    scenario: String,
    system: String,
    runs: usize,
    median: f64,
    min: f64,
    max: f64,
    redis_cpu: f64,
    /// Peer rows: keyfleet / this system, as the ratio of the medians and the median of the
    /// per-round ratios (run i of keyfleet against run i of this system, in the same round).
    ratio: Option<(f64, f64)>,
}

impl Row {
    fn single(scenario: &str, system: &str, samples: &[Sample]) -> Row {
        let rates: Vec<f64> = samples.iter().map(Sample::jobs_per_sec).collect();
        Row {
            scenario: scenario.to_owned(),
            system: system.to_owned(),
            runs: samples.len(),
            median: median(samples),
            min: rates.iter().copied().fold(f64::INFINITY, f64::min),
            max: rates.iter().copied().fold(0.0, f64::max),
            redis_cpu: median_of(samples.iter().map(Sample::redis_cpu_per_job).collect()),
            ratio: None,
        }
    }

    /// keyfleet's row, then one row per peer carrying keyfleet / peer.
    fn compare<'a, const N: usize>(
        scenario: &str,
        keyfleet: &[Sample],
        peers: [(&'a str, &'a [Sample]); N],
    ) -> Vec<Row> {
        let kf = Row::single(scenario, "keyfleet", keyfleet);
        let mut rows = Vec::with_capacity(N + 1);
        for (system, samples) in peers {
            let mut peer = Row::single(scenario, system, samples);
            let rounds = keyfleet
                .iter()
                .zip(samples)
                .map(|(k, p)| k.jobs_per_sec() / p.jobs_per_sec())
                .collect();
            peer.ratio = Some((kf.median / peer.median, median_of(rounds)));
            rows.push(peer);
        }
        rows.insert(0, kf);
        rows
    }

    fn print(&self) {
        let ratio = self.ratio.map_or(String::new(), |(of_medians, of_pairs)| {
            format!("**{of_medians:.2}x** (pairs {of_pairs:.2}x)")
        });
        println!(
            "| {} | {} | {} | {:.0} | {:.0} - {:.0} | {ratio} | {:.0} |",
            self.scenario, self.system, self.runs, self.median, self.min, self.max, self.redis_cpu
        );
    }
}

fn median(samples: &[Sample]) -> f64 {
    median_of(samples.iter().map(Sample::jobs_per_sec).collect())
}

fn median_of(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

fn median_stop_ms(samples: &[Sample]) -> f64 {
    let mut stops: Vec<f64> = samples.iter().map(|s| s.stop.as_secs_f64() * 1e3).collect();
    stops.sort_by(f64::total_cmp);
    stops[stops.len() / 2]
}

fn peak_per_server(samples: &[Sample]) -> Vec<u64> {
    (0..SERVERS)
        .map(|i| {
            samples
                .iter()
                .filter_map(|s| s.peaks.get(i))
                .copied()
                .max()
                .unwrap_or(0)
        })
        .collect()
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Counts acknowledged jobs and tells the worker(s) to stop after the last one.
struct Progress {
    target: usize,
    done: AtomicUsize,
    errors: AtomicUsize,
    last_done: OnceLock<Instant>,
    all_done: watch::Sender<bool>,
}

impl Progress {
    fn new(target: usize) -> Arc<Self> {
        Arc::new(Self {
            target,
            done: AtomicUsize::new(0),
            errors: AtomicUsize::new(0),
            last_done: OnceLock::new(),
            all_done: watch::channel(false).0,
        })
    }

    fn complete(&self) {
        if self.done.fetch_add(1, Ordering::AcqRel) + 1 == self.target {
            let _ = self.last_done.set(Instant::now());
            self.all_done.send_replace(true);
        }
    }

    fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The shutdown signal for `Worker::run_until`.
    fn until_done(&self) -> impl Future<Output = Result<(), std::io::Error>> + Send + 'static {
        let mut done = self.all_done.subscribe();
        async move {
            let _ = done.wait_for(|d| *d).await;
            Ok(())
        }
    }

    fn check(&self) -> anyhow::Result<Instant> {
        let errors = self.errors.load(Ordering::Relaxed);
        ensure!(errors == 0, "{errors} jobs failed");
        self.last_done
            .get()
            .copied()
            .context("the worker stopped before every job was done")
    }
}

/// One pooled HTTP client per fake server, as keyfleet's workers hold them.
struct Http {
    servers: Vec<(reqwest::Client, String, String)>,
}

impl Http {
    fn new(fleet: &FakeFleet) -> anyhow::Result<Self> {
        let servers = fleet
            .servers
            .iter()
            .map(|server| {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()?;
                let key = server.api_key().context("a V2Ray fake has an API key")?;
                Ok((client, server.api_url(), key))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { servers })
    }

    /// GET /api/keys/{uuid}/link on the job's server; a 404 is the expected answer (no such key):
    /// the round trip is what counts.
    async fn round_trip(&self, job: &JobPayload) -> bool {
        let Some((client, base, key)) = usize::try_from(job.server().0 - 1)
            .ok()
            .and_then(|i| self.servers.get(i))
        else {
            return false;
        };
        let uuid = Uuid::new_v5(
            &Uuid::NAMESPACE_URL,
            job.subscription().expect("a key job").as_str().as_bytes(),
        );
        let response = client
            .get(format!("{base}/api/keys/{uuid}/link"))
            .header("X-API-Key", key)
            .send()
            .await;
        match response {
            Ok(response) => {
                let status = response.status().as_u16();
                response.bytes().await.is_ok() && (status == 404 || status == 200)
            }
            Err(_) => false,
        }
    }
}

fn reset_meters(fleet: Option<&FakeFleet>) {
    if let Some(fleet) = fleet {
        fleet.servers.iter().for_each(|s| s.reset_meter());
    }
}

fn peaks(fleet: Option<&FakeFleet>) -> Vec<u64> {
    fleet.map_or_else(Vec::new, |fleet| {
        fleet
            .servers
            .iter()
            .map(|s| s.meter().peak_in_flight)
            .collect()
    })
}

#[derive(Clone)]
struct KeyfleetJob {
    queue: Queue,
    /// `None`: finish without claiming the next job (the diagnostic row).
    handoff: Option<Handoff>,
    leases: LeaseRegistry,
    http: Option<Arc<Http>>,
    progress: Arc<Progress>,
}

/// The benchmark's queues are initialised before they run and no server fails: the hooks are
/// never needed.
struct BenchHooks;

impl ClaimHooks for BenchHooks {
    fn initialize(&self) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async { panic!("the benchmark initialises its queue before running") })
    }
    fn probe(&self, _: ServerId) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async { panic!("no breaker opens in the benchmark") })
    }
}

const LEASE: Duration = Duration::from_secs(15);

/// keyfleet's handler: hold the lease (heartbeats extend it), do the work, acknowledge with a
/// fenced `finish`.
async fn keyfleet_job(job: ClaimedJob, ctx: Data<KeyfleetJob>) -> Result<(), BoxDynError> {
    let _lease = ctx.leases.hold(&job, LEASE);
    if let Some(http) = &ctx.http {
        let ok = match JobPayload::from_json(&job.payload) {
            Ok(payload) => http.round_trip(&payload).await,
            Err(_) => false,
        };
        if !ok {
            ctx.progress.error();
        }
    }
    let finished = match &ctx.handoff {
        Some(handoff) => handoff.finish(&job, &Finish::Done).await,
        None => ctx.queue.finish(&job, &Finish::Done).await,
    };
    match finished {
        Ok((FinishResult::Applied, _)) => {}
        _ => ctx.progress.error(),
    }
    ctx.progress.complete();
    Ok(())
}

/// How keyfleet's side runs: its claim loops, and whether finishes claim the next job
/// ([`Handoff`]).
#[derive(Clone, Copy)]
struct Shape {
    claim_loops: usize,
    hand_off: bool,
}

impl Shape {
    /// As `keyfleet worker` runs at this concurrency.
    fn worker(concurrency: usize) -> Self {
        Self {
            claim_loops: claim_loops(concurrency),
            hand_off: true,
        }
    }
}

async fn run_keyfleet(
    redis_url: &str,
    jobs: &[JobPayload],
    limit: u32,
    concurrency: usize,
    shape: Shape,
    http: Option<(Arc<Http>, &FakeFleet)>,
) -> anyhow::Result<Sample> {
    let prefix = format!("kfbench:{}", Uuid::new_v4().simple());
    let queue = Queue::connect(redis_url, QueueConfig::new(prefix))?;
    let (http, fleet) = http.unzip();
    let result = async {
        queue.initialize(1).await?;
        let limits: Vec<(ServerId, u32)> =
            (1..=SERVERS as i64).map(|s| (ServerId(s), limit)).collect();
        queue.set_limits(&limits).await?;
        for chunk in jobs.chunks(ENQUEUE_CHUNK) {
            let enqueued = queue.enqueue_all(chunk).await?;
            ensure!(enqueued.iter().all(|e| e.created), "a job was not created");
        }
        reset_meters(fleet);
        let leases = LeaseRegistry::default();
        let maintenance = spawn_maintenance(queue.clone(), leases.clone());
        let wake = WakeSignal::spawn(&queue);
        let progress = Progress::new(jobs.len());
        let mut cpu = RedisCpu::connect(redis_url).await?;
        let calls_before = cpu.script_calls().await?;
        let cpu_before = cpu.now().await?;
        let handoff = Handoff::new(
            queue.clone(),
            format!("kfbench-{}", Uuid::new_v4().simple()),
            wake,
            Arc::new(BenchHooks),
            concurrency,
            leases.clone(),
        );
        let ctx = KeyfleetJob {
            queue: queue.clone(),
            handoff: shape.hand_off.then(|| handoff.clone()),
            leases,
            http,
            progress: progress.clone(),
        };
        let process_before = process_cpu("self").unwrap_or_default();
        let started = Instant::now();
        let workers = shape.claim_loops;
        let running = (0..workers).map(|w| {
            let name = format!("kfbench-{w}-{}", Uuid::new_v4().simple());
            WorkerBuilder::new(name.as_str())
                .backend(QueueBackend::new(handoff.clone(), name.as_str()))
                .layer(ConcurrencyLimitLayer::new(
                    concurrency / workers + usize::from(w < concurrency % workers),
                ))
                .data(ctx.clone())
                .build(keyfleet_job)
                .run_until(progress.until_done())
        });
        let outcome =
            tokio::time::timeout(RUN_TIMEOUT, futures::future::try_join_all(running)).await;
        let stopped = Instant::now();
        let client_cpu = process_cpu("self")
            .unwrap_or_default()
            .saturating_sub(process_before);
        let redis_cpu = cpu.now().await? - cpu_before;
        let script_calls = cpu.script_calls().await?.saturating_sub(calls_before);
        maintenance.abort();
        outcome.context("timed out")??;
        let last_done = progress.check()?;
        let stats = queue.stats().await?;
        ensure!(
            stats.done == jobs.len() as u64 && stats.ready + stats.running + stats.delayed == 0,
            "keyfleet's queue does not show every job done: {stats:?}"
        );
        Ok(Sample {
            jobs: jobs.len(),
            elapsed: last_done - started,
            stop: stopped - last_done,
            peaks: peaks(fleet),
            redis_cpu: Duration::from_secs_f64(redis_cpu.max(0.0)),
            client_cpu,
            script_calls,
        })
    }
    .await;
    let _ = queue.purge().await;
    result
}

#[derive(Clone)]
struct ApalisJob {
    http: Option<Arc<Http>>,
    progress: Arc<Progress>,
}

/// apalis-redis's handler: do the work; apalis acknowledges when it returns.
async fn apalis_job(job: JobPayload, ctx: Data<ApalisJob>) -> Result<(), BoxDynError> {
    if let Some(http) = &ctx.http
        && !http.round_trip(&job).await
    {
        ctx.progress.error();
    }
    ctx.progress.complete();
    Ok(())
}

async fn run_apalis(
    redis_url: &str,
    jobs: &[JobPayload],
    concurrency: usize,
    http: Option<(Arc<Http>, &FakeFleet)>,
) -> anyhow::Result<Sample> {
    let id = Uuid::new_v4().simple().to_string();
    let namespace = format!("kfbench-apalis:{id}");
    let conn = apalis_redis::connect(redis_url).await?;
    let (http, fleet) = http.unzip();
    let result = async {
        let mut storage = RedisStorage::<JobPayload>::new(conn.clone())
            .with_config(ApalisConfig::default().queue(&namespace));
        for chunk in jobs.chunks(ENQUEUE_CHUNK) {
            storage.push_bulk(chunk.to_vec()).await?;
        }
        reset_meters(fleet);
        let progress = Progress::new(jobs.len());
        let name = format!("kfbench-apalis-{id}");
        let worker = WorkerBuilder::new(name.as_str())
            .backend(storage)
            .layer(ConcurrencyLimitLayer::new(concurrency))
            .data(ApalisJob {
                http,
                progress: progress.clone(),
            })
            .build(apalis_job);
        let mut cpu = RedisCpu::connect(redis_url).await?;
        let calls_before = cpu.script_calls().await?;
        let cpu_before = cpu.now().await?;
        let process_before = process_cpu("self").unwrap_or_default();
        let started = Instant::now();
        let outcome =
            tokio::time::timeout(RUN_TIMEOUT, worker.run_until(progress.until_done())).await;
        let stopped = Instant::now();
        let client_cpu = process_cpu("self")
            .unwrap_or_default()
            .saturating_sub(process_before);
        let redis_cpu = cpu.now().await? - cpu_before;
        let script_calls = cpu.script_calls().await?.saturating_sub(calls_before);
        match outcome {
            Err(_) => bail!("timed out after {RUN_TIMEOUT:?}"),
            Ok(Err(error)) => bail!(
                "the apalis worker exited with an error after {} of {} jobs: {error}",
                progress.done.load(Ordering::Relaxed),
                jobs.len()
            ),
            Ok(Ok(())) => {}
        }
        let last_done = progress.check()?;
        let acknowledged: u64 = redis::cmd("SCARD")
            .arg(format!("{namespace}:done"))
            .query_async(&mut conn.clone())
            .await?;
        ensure!(
            acknowledged == jobs.len() as u64,
            "apalis-redis acknowledged {acknowledged} of {} jobs",
            jobs.len()
        );
        Ok(Sample {
            jobs: jobs.len(),
            elapsed: stopped - started,
            stop: stopped - last_done,
            peaks: peaks(fleet),
            redis_cpu: Duration::from_secs_f64(redis_cpu.max(0.0)),
            client_cpu,
            script_calls,
        })
    }
    .await;
    let _ = purge_apalis(conn, &namespace).await;
    result
}

/// A `redis-server` of the bench's own on a free loopback port, stopped when dropped.
struct RedisServer {
    child: std::process::Child,
    port: u16,
    url: String,
}

impl RedisServer {
    /// The same binary and settings for every instance: no persistence (as `.ci/services.sh` runs
    /// the shared one), the log in `work/redis-<name>/redis.log`.
    async fn start(work: &Path, name: &str) -> anyhow::Result<Self> {
        let dir = work.join(format!("redis-{name}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        // The kernel's free port; redis-server binds it right after (a race with another process
        // taking it in between shows as redis-server exiting, below).
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| match error.kind() {
                std::io::ErrorKind::NotFound => anyhow::anyhow!(
                    "the queue benchmark starts Redis servers of its own and `redis-server` is \
                     not on PATH (install it: apt-get install redis-server, or bash \
                     .ci/services.sh)"
                ),
                _ => anyhow::anyhow!("start redis-server: {error}"),
            })?;
        let mut server = Self {
            child,
            port,
            url: format!("redis://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "redis-server on port {port} exited ({status}) before answering; its log: {}",
                    dir.join("redis.log").display()
                );
            }
            match ping(&server.url).await {
                Ok(()) => return Ok(server),
                Err(error) if Instant::now() > deadline => {
                    bail!("redis-server on port {port} did not answer PING within 10 s: {error:#}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    async fn flush(&self) -> anyhow::Result<()> {
        let mut conn = redis::Client::open(self.url.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        let _: String = redis::cmd("FLUSHALL").query_async(&mut conn).await?;
        Ok(())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn ping(redis_url: &str) -> anyhow::Result<()> {
    let mut conn = redis::Client::open(redis_url)?
        .get_multiplexed_async_connection()
        .await?;
    let _: String = redis::cmd("PING").query_async(&mut conn).await?;
    Ok(())
}

/// BullMQ's side, installed: `benches/bullmq` copied into `dir` and `npm ci` run there.
struct Bullmq {
    dir: PathBuf,
    version: String,
    node: String,
}

impl Bullmq {
    async fn install(dir: &Path) -> anyhow::Result<Self> {
        let node = tokio::process::Command::new("node")
            .arg("--version")
            .output()
            .await
            .map_err(|error| {
                anyhow::anyhow!(
                    "the queue benchmark runs BullMQ beside keyfleet and needs Node.js: `node \
                     --version` failed ({error}); install node and npm (apt-get install nodejs npm)"
                )
            })?;
        ensure!(
            node.status.success(),
            "`node --version` failed: {}",
            node.status
        );
        let node = String::from_utf8_lossy(&node.stdout).trim().to_owned();
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        for file in BULLMQ_FILES {
            let from = Path::new(BULLMQ_SOURCE).join(file);
            std::fs::copy(&from, dir.join(file))
                .with_context(|| format!("copy {} to {}", from.display(), dir.display()))?;
        }
        // Exactly the locked tree; no install scripts (msgpackr's optional native addon is left out,
        // msgpackr then runs as plain JavaScript).
        let mut npm = tokio::process::Command::new("npm");
        npm.args([
            "ci",
            "--ignore-scripts",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
        ])
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
        let installed = tokio::time::timeout(NPM_TIMEOUT, npm.output())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "`npm ci` in {} took over {NPM_TIMEOUT:?}: is the npm registry reachable?",
                    dir.display()
                )
            })?
            .map_err(|error| {
                anyhow::anyhow!(
                    "the queue benchmark installs BullMQ with npm: `npm ci` could not start \
                     ({error}); install npm (apt-get install npm)"
                )
            })?;
        ensure!(
            installed.status.success(),
            "`npm ci` in {} failed ({}): is the npm registry reachable? {}",
            dir.display(),
            installed.status,
            String::from_utf8_lossy(&installed.stderr).trim()
        );
        let manifest = dir.join("node_modules/bullmq/package.json");
        let manifest: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&manifest)
                .with_context(|| format!("read {}", manifest.display()))?,
        )?;
        let version = manifest["version"]
            .as_str()
            .context("bullmq's package.json has no version")?
            .to_owned();
        Ok(Self {
            dir: dir.to_owned(),
            version,
            node,
        })
    }
}

/// One BullMQ run: its Redis flushed, the jobs and the fake servers' addresses handed to
/// `bench.cjs` in a spec file, its one-line JSON report read back. Each run is a new `node`
/// process, which drains `warmup` first (unmeasured) so that its JIT and HTTP connections are as
/// warm as those of the Rust side, whose runs share one process.
async fn run_bullmq(
    (bullmq, redis): (&Bullmq, &RedisServer),
    jobs: &[JobPayload],
    warmup: &[JobPayload],
    concurrency: usize,
    http: Option<(Arc<Http>, &FakeFleet)>,
) -> anyhow::Result<Sample> {
    redis.flush().await?;
    let (http, fleet) = http.unzip();
    let servers: Vec<serde_json::Value> = http
        .iter()
        .flat_map(|h| &h.servers)
        .map(|(_, url, key)| serde_json::json!({ "url": url, "key": key }))
        .collect();
    let spec = serde_json::json!({
        "redis_port": redis.port,
        "concurrency": concurrency,
        "jobs": jobs,
        "warmup": warmup,
        "servers": servers,
    });
    let spec_path = bullmq.dir.join("spec.json");
    std::fs::write(&spec_path, spec.to_string())
        .with_context(|| format!("write {}", spec_path.display()))?;
    reset_meters(fleet);
    let child = tokio::process::Command::new("node")
        .arg("bench.cjs")
        .arg(&spec_path)
        .current_dir(&bullmq.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start node bench.cjs")?;
    let output = tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| anyhow::anyhow!("BullMQ's run timed out after {RUN_TIMEOUT:?}"))??;
    ensure!(
        output.status.success(),
        "node bench.cjs failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "bench.cjs printed no JSON report: {:?}",
            String::from_utf8_lossy(&output.stdout)
        )
    })?;
    let number = |field: &str| {
        report[field]
            .as_f64()
            .with_context(|| format!("bench.cjs's report has no number {field:?}: {report}"))
    };
    ensure!(
        number("errors")? == 0.0,
        "BullMQ: {} jobs failed",
        number("errors")?
    );
    ensure!(
        number("completed")? == jobs.len() as f64 && number("left")? == 0.0,
        "BullMQ's queue does not show every job completed: {report}"
    );
    Ok(Sample {
        jobs: jobs.len(),
        elapsed: Duration::from_secs_f64(number("elapsed_s")?),
        stop: Duration::from_secs_f64(number("stop_s")?),
        peaks: peaks(fleet),
        redis_cpu: Duration::from_secs_f64(number("redis_cpu_s")?),
        client_cpu: Duration::from_secs_f64(number("worker_cpu_s")?),
        script_calls: number("script_calls")? as u64,
    })
}

/// Deletes the keys of one apalis-redis queue, and its entry in apalis's global queue list.
async fn purge_apalis(
    mut conn: apalis_redis::ConnectionManager,
    namespace: &str,
) -> anyhow::Result<()> {
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{namespace}:*"))
            .arg("COUNT")
            .arg(1_000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let _: u64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut conn)
                .await?;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let _: u64 = redis::cmd("ZREM")
        .arg("core:apalis:queues:list")
        .arg(format!("{namespace}:workers"))
        .query_async(&mut conn)
        .await?;
    Ok(())
}

/// Mean time of `n` sequential PINGs on one multiplexed connection.
async fn ping_round_trip(redis_url: &str, n: u32) -> anyhow::Result<Duration> {
    let mut conn = redis::Client::open(redis_url)?
        .get_multiplexed_async_connection()
        .await?;
    let _: String = redis::cmd("PING").query_async(&mut conn).await?;
    let started = Instant::now();
    for _ in 0..n {
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
    }
    Ok(started.elapsed() / n)
}

/// What each keyfleet script costs, run one at a time with nothing else of ours running: the round
/// trip a caller waits for, and the time Redis spends inside the script (`INFO commandstats`; on a
/// shared Redis other clients' scripts in the same window count too).
struct ScriptCosts {
    enqueue: (Duration, Duration),
    claim: (Duration, Duration),
    finish: (Duration, Duration),
}

async fn script_costs(redis_url: &str, n: usize) -> anyhow::Result<ScriptCosts> {
    let queue = Queue::connect(
        redis_url,
        QueueConfig::new(format!("kfbench:{}", Uuid::new_v4().simple())),
    )?;
    let mut stats = redis::Client::open(redis_url)?
        .get_multiplexed_async_connection()
        .await?;
    let result = async {
        queue.initialize(1).await?;
        let limits: Vec<(ServerId, u32)> = (1..=SERVERS as i64)
            .map(|s| (ServerId(s), n as u32))
            .collect();
        queue.set_limits(&limits).await?;
        let per_call = |started: Instant, before: u64, after: u64| {
            (
                started.elapsed() / n as u32,
                Duration::from_micros(after.saturating_sub(before) / n as u64),
            )
        };
        let before = script_micros(&mut stats).await?;
        let started = Instant::now();
        for job in payloads(n) {
            queue.enqueue(&job).await?;
        }
        let enqueue = per_call(started, before, script_micros(&mut stats).await?);
        let mut claimed = Vec::with_capacity(n);
        let before = script_micros(&mut stats).await?;
        let started = Instant::now();
        for _ in 0..n {
            match queue.claim("kfbench-claim").await? {
                Claim::Job(job) => claimed.push(job),
                other => bail!("ran out of jobs to claim: {other:?}"),
            }
        }
        let claim = per_call(started, before, script_micros(&mut stats).await?);
        let before = script_micros(&mut stats).await?;
        let started = Instant::now();
        for job in &claimed {
            queue.finish(job, &Finish::Done).await?;
        }
        let finish = per_call(started, before, script_micros(&mut stats).await?);
        Ok(ScriptCosts {
            enqueue,
            claim,
            finish,
        })
    }
    .await;
    let _ = queue.purge().await;
    result
}

/// Total microseconds Redis has spent in EVALSHA so far.
async fn script_micros(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:"))
        .and_then(|l| l.split(',').find_map(|f| f.strip_prefix("usec=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

async fn redis_version(redis_url: &str) -> anyhow::Result<String> {
    let mut conn = redis::Client::open(redis_url)?
        .get_multiplexed_async_connection()
        .await?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_owned())
}

fn env_usize(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(raw) if !raw.trim().is_empty() => raw
            .trim()
            .parse()
            .with_context(|| format!("{name}={raw:?} is not a whole number")),
        _ => Ok(default),
    }
}
