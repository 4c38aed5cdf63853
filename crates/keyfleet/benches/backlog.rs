//! End to end at a backlog: what one worker process gets through when the queue is deep.
//!
//! `KF_BENCH_BACKLOG` (default 100,000) create jobs queued over 10 V2Ray + 1 Outline fake servers
//! with no latency, drained by one `keyfleet worker --concurrency 64` (the release build cargo
//! bench makes; limit 8 per server). Each job is a claim, a create and (V2Ray) a link request, the
//! batched write-back to Postgres and the acknowledgement. The backlog is seeded as the producer
//! leaves it (a `pending` key row per job, and the job queued), without timing the seeding. After
//! the drain every key must be `active` in Postgres and stored exactly once on its fake.
//!
//! **Baseline**, in the same run before and after the drain: the same requests made directly by
//! this process, `VpnClient::ensure_key` with 64 at once and no queue or database, on a tenth of
//! the backlog: what the HTTP work alone costs the fakes and a client on this machine.
//!
//! Reported: jobs/s of both and their ratio, the worker's CPU per job (user + system, from
//! `/proc`), and its RSS at 10 % of the drain and at most in its second half (flat memory: the
//! backlog lives in Redis, not in the worker).
//! Run: `cargo bench -p keyfleet --bench backlog` (part of `just bench`). Needs Postgres and Redis
//! on 127.0.0.1 (`DATABASE_URL`, `REDIS_URL`); makes a database `kf_bench_<uuid>` and drops it.

mod common;

use std::{
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use futures::StreamExt;
use keyfleet_core::{JobPayload, ServerId, SubscriptionId};
use keyfleet_fakevpn::{FakeFleet, FakeServerConfig};
use keyfleet_queue::{Queue, QueueConfig};
use keyfleet_store::NewServer;
use keyfleet_vpn::{ClientConfig, ServerEndpoint, VpnClient};

use crate::common::{Deployment, listening_on, load_average, process_cpu, rss_kib};

const V2RAY: usize = 10;
const OUTLINE: usize = 1;
const LIMIT: i32 = 8;
const CONCURRENCY: usize = 64;
const ENQUEUE_CHUNK: usize = 5_000;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(900);

fn main() -> anyhow::Result<()> {
    let jobs: usize = match std::env::var("KF_BENCH_BACKLOG") {
        Ok(v) => v.parse().context("KF_BENCH_BACKLOG")?,
        Err(_) => 100_000,
    };
    ensure!(
        jobs >= 10 * (V2RAY + OUTLINE),
        "KF_BENCH_BACKLOG must be at least 110"
    );
    tokio::runtime::Runtime::new()?.block_on(bench(jobs))
}

async fn bench(jobs: usize) -> anyhow::Result<()> {
    println!(
        "# Worker end to end: {jobs} queued creates over {V2RAY} V2Ray + {OUTLINE} Outline fakes \
         (0 ms), one `keyfleet worker --concurrency {CONCURRENCY}`, limit {LIMIT} per server \
         (release build)"
    );
    let fleet = FakeFleet::start(V2RAY, OUTLINE, |kind, i| {
        FakeServerConfig::new(kind).with_seed(i as u64)
    })
    .await
    .context("start the fake fleet")?;
    let baseline_keys = jobs / 10;
    let before = direct(&fleet, "directa", baseline_keys).await?;
    let deployment = Deployment::create().await?;
    let drained = drain(&deployment, &fleet, jobs).await;
    deployment.drop().await?;
    let drained = drained?;
    let after = direct(&fleet, "directb", baseline_keys).await?;
    fleet.shutdown().await;

    let baseline = (before + after) / 2.0;
    let rate = drained.jobs_per_sec();
    println!();
    println!("| what | jobs/s |");
    println!("|---|---:|");
    println!(
        "| keyfleet worker: {jobs} jobs drained in {:.1} s, each key active in Postgres | **{rate:.0}** |",
        drained.elapsed.as_secs_f64()
    );
    println!(
        "| baseline: the same requests made directly, {baseline_keys} keys, before / after the drain | {before:.0} / {after:.0} |"
    );
    println!("| keyfleet / baseline | **{:.2}x** |", rate / baseline);
    println!();
    println!(
        "Worker CPU per job: {:.0} us (user + system, all threads). Worker RSS: {} KiB at 10 % of \
         the drain, {} KiB at most in its second half ({:+.1} %).",
        drained.cpu.as_secs_f64() * 1e6 / jobs as f64,
        drained.rss_early_kib,
        drained.rss_late_kib,
        (drained.rss_late_kib as f64 / drained.rss_early_kib as f64 - 1.0) * 100.0
    );
    let wb = &drained.writeback;
    println!(
        "Write-back: {:.0} commits for {:.0} results ({:.1} per 1,000; {:.1} rows each), {:.2} ms \
         per commit on average, {:.0} % of the drain spent committing.",
        wb.commits,
        wb.rows,
        wb.commits * 1000.0 / wb.rows,
        wb.rows / wb.commits,
        wb.commit_seconds * 1e3 / wb.commits,
        wb.commit_seconds * 100.0 / drained.elapsed.as_secs_f64()
    );
    println!("Load average at the end: {}.", load_average());
    Ok(())
}

/// Keys per second made by this process on the fleet directly: `ensure_key` (create, then link
/// for V2Ray), `CONCURRENCY` at once, keys spread round-robin over the servers.
async fn direct(fleet: &FakeFleet, prefix: &str, keys: usize) -> anyhow::Result<f64> {
    let clients = fleet
        .servers
        .iter()
        .enumerate()
        .map(|(i, fake)| {
            VpnClient::new(
                &ServerEndpoint {
                    name: format!("direct-{i}"),
                    kind: fake.kind(),
                    api_url: fake.api_url().parse()?,
                    api_key: fake.api_key(),
                    cert_sha256: fake.cert_sha256(),
                    grpc: None,
                    key_secret: None,
                },
                &ClientConfig::default(),
            )
            .map_err(anyhow::Error::from)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let servers = clients.len();
    let started = Instant::now();
    let mut made = futures::stream::iter(0..keys)
        .map(|i| {
            let client = &clients[i % servers];
            async move {
                let sub = SubscriptionId::parse(&format!("{prefix}{}", i / servers))?;
                client.ensure_key(&sub, false).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY);
    while let Some(made) = made.next().await {
        made?;
    }
    Ok(keys as f64 / started.elapsed().as_secs_f64())
}

struct Drained {
    jobs: usize,
    elapsed: Duration,
    cpu: Duration,
    rss_early_kib: u64,
    rss_late_kib: u64,
    writeback: WriteBackFigures,
}

impl Drained {
    fn jobs_per_sec(&self) -> f64 {
        self.jobs as f64 / self.elapsed.as_secs_f64()
    }
}

async fn drain(deployment: &Deployment, fleet: &FakeFleet, jobs: usize) -> anyhow::Result<Drained> {
    let store = &deployment.store;
    let mut servers = Vec::new();
    for (i, fake) in fleet.servers.iter().enumerate() {
        let server = store
            .add_server(&NewServer {
                name: format!("bl-{i}"),
                kind: fake.kind(),
                api_url: fake.api_url(),
                api_key: fake.api_key(),
                cert_sha256: fake.cert_sha256(),
                max_in_flight: LIMIT,
                grpc: None,
                key_secret: None,
            })
            .await?;
        servers.push(server.id);
    }
    let queue = Queue::connect(
        &deployment.redis_url,
        QueueConfig::new(deployment.prefix.clone()),
    )?;
    // As a keyfleet process would on first use: fences from an epoch Postgres handed out.
    queue.initialize(store.next_fence_epoch().await?).await?;
    let payloads = seed_pending_keys(deployment, &servers, jobs).await?;
    for chunk in payloads.chunks(ENQUEUE_CHUNK) {
        let enqueued = queue.enqueue_all(chunk).await?;
        ensure!(enqueued.iter().all(|e| e.created), "a job was not created");
    }
    drop(payloads);
    let before = fleet.total_meter();

    let worker = deployment
        .command(&[
            "worker",
            "--concurrency",
            &CONCURRENCY.to_string(),
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start keyfleet worker")?;
    let mut worker = KillOnDrop(worker);
    let metrics = listening_on(&mut worker.0, "metrics listening on ")?;
    let pid = worker.0.id();
    let started = Instant::now();
    let mut samples: Vec<(u64, u64)> = Vec::new(); // (jobs done, RSS KiB)
    let cpu_at_start = process_cpu(&pid.to_string()).unwrap_or_default();
    let mut cpu = cpu_at_start;
    loop {
        let done = queue.stats().await?.done;
        if let Some(rss) = rss_kib(&pid.to_string()) {
            samples.push((done, rss));
        }
        if let Some(now) = process_cpu(&pid.to_string()) {
            cpu = now;
        }
        if done >= jobs as u64 {
            break;
        }
        if let Some(status) = worker.0.try_wait()? {
            bail!("the worker exited with {status} after {done} of {jobs} jobs");
        }
        ensure!(
            started.elapsed() < DRAIN_TIMEOUT,
            "only {done} of {jobs} jobs done after {DRAIN_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    let writeback = WriteBackFigures::scrape(&metrics).await?;
    worker.stop()?;

    let stats = queue.stats().await?;
    ensure!(
        stats.done == jobs as u64 && stats.ready + stats.running + stats.delayed + stats.dead == 0,
        "the queue does not show every job done: {stats:?}"
    );
    let active = store.count_keys_in_state("active").await?;
    ensure!(
        active == jobs as i64,
        "{active} keys active in Postgres, want {jobs}"
    );
    let after = fleet.total_meter();
    let created = after.creates_committed - before.creates_committed;
    ensure!(
        created == jobs as u64 && after.duplicates == before.duplicates,
        "the fakes stored {created} keys for {jobs} jobs, {} duplicates",
        after.duplicates - before.duplicates
    );
    let n = jobs as u64;
    let rss_early_kib = samples
        .iter()
        .find(|(done, _)| *done >= n / 10)
        .map_or(0, |(_, rss)| *rss);
    let rss_late_kib = samples
        .iter()
        .filter(|(done, _)| *done >= n / 2)
        .map(|(_, rss)| *rss)
        .max()
        .unwrap_or(0);
    Ok(Drained {
        jobs,
        elapsed,
        cpu: cpu.saturating_sub(cpu_at_start),
        rss_early_kib,
        rss_late_kib,
        writeback,
    })
}

/// The worker's write-back over the drain, from its `/metrics`.
struct WriteBackFigures {
    commits: f64,
    rows: f64,
    commit_seconds: f64,
}

impl WriteBackFigures {
    async fn scrape(metrics: &str) -> anyhow::Result<Self> {
        let text = reqwest::get(format!("{metrics}/metrics"))
            .await?
            .error_for_status()?
            .text()
            .await?;
        let value = |name: &str| -> anyhow::Result<f64> {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
                .with_context(|| format!("no {name} in the worker's /metrics"))?
                .trim()
                .parse()
                .with_context(|| format!("{name} in the worker's /metrics"))
        };
        Ok(Self {
            commits: value("keyfleet_writeback_batch_rows_count")?,
            rows: value("keyfleet_writeback_batch_rows_sum")?,
            commit_seconds: value("keyfleet_writeback_commit_seconds_sum")?,
        })
    }
}

/// What a producer leaves for a backlog of `jobs` creates: subscriptions, a `pending` key row per
/// job (servers round-robin), and the create jobs to queue.
async fn seed_pending_keys(
    deployment: &Deployment,
    servers: &[ServerId],
    jobs: usize,
) -> anyhow::Result<Vec<JobPayload>> {
    let n = servers.len();
    let ids = servers
        .iter()
        .map(|s| s.0.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let store = &deployment.store;
    store
        .execute_admin(&format!(
            "INSERT INTO subscriptions (id) SELECT 'bl' || g FROM generate_series(0, {}) g",
            jobs.div_ceil(n) - 1
        ))
        .await?;
    store
        .execute_admin(&format!(
            "INSERT INTO keys (subscription_id, server_id, state, enqueued_at)
             SELECT 'bl' || (g / {n}), (ARRAY[{ids}]::bigint[])[g % {n} + 1], 'pending', now()
             FROM generate_series(0, {}) g",
            jobs - 1
        ))
        .await?;
    // As autovacuum would have by the time a producer had written this many rows one by one.
    store.execute_admin("ANALYZE subscriptions, keys").await?;
    (0..jobs)
        .map(|g| {
            Ok(JobPayload::create(
                servers[g % n],
                SubscriptionId::parse(&format!("bl{}", g / n))?,
            ))
        })
        .collect()
}

/// The worker, stopped with SIGTERM when the bench is done or fails.
struct KillOnDrop(Child);

impl KillOnDrop {
    fn stop(&mut self) -> anyhow::Result<()> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let status = self.0.wait()?;
        ensure!(
            status.success(),
            "the worker exited with {status} at SIGTERM"
        );
        Ok(())
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
