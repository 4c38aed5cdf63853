//! Sweeps and write-back, each measured beside the naive way in the same run (the machine is shared
//! and noisy: compare the ratios, not the absolute figures). Figures in BENCHMARKS.md.
//!
//! `cargo bench -p keyfleet --bench sweeps`
//!
//! (a) Reconcile of an in-sync fleet of V2Ray servers (zero-latency fakes, in this process): per
//!     server one `list_keys` + `Store::stored_keys` + `reconcile::diff`, 16 servers at a time, against
//!     the seed's sync, which fetches every key's link (`GET /api/keys/{uuid}/link`), given the same
//!     16 requests in flight. If the naive run over the whole fleet would take more than two minutes
//!     it runs on a subset of the servers, and the whole-fleet figure is an extrapolation.
//! (b) Write-back of `KeyWrite::Created` results by 64 concurrent writers: through `WriteBack` as the
//!     worker runs it (`spawn_with`, told how many jobs it holds), against one `UPDATE` and commit
//!     per row; and, for reference, through `WriteBack::spawn` (the 50 ms window alone). Commits are
//!     Postgres's own count (`pg_stat_database.xact_commit` of the bench database), cross-checked
//!     by the distinct `now()` of the rows written.
//!
//! Needs Postgres on 127.0.0.1 (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`);
//! creates a database `kf_bench_<uuid>` there and drops it at the end. Sizes can be changed for a
//! quick try with `KF_BENCH_SERVERS`, `KF_BENCH_KEYS`, `KF_BENCH_SUBSET`, `KF_BENCH_ROWS`,
//! `KF_BENCH_ROUNDS`; the figures in BENCHMARKS.md use the defaults.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use futures::{FutureExt, StreamExt, TryStreamExt, stream};
use keyfleet::{reconcile, servers::ServerClients};
use keyfleet_core::{ServerId, ServerKind, SubscriptionId};
use keyfleet_fakevpn::{FakeFleet, FakeServerConfig};
use keyfleet_store::{Contributors, KeyWrite, NewServer, Store, WriteBack, WriteBackConfig};
use keyfleet_vpn::{ClientConfig, VpnClient};
use sqlx::PgPool;

use crate::common::BenchDatabase;

/// Servers reconciled at a time, like a worker fleet's claims.
const SERVER_CONCURRENCY: usize = 16;
/// Concurrent writers of results, like a worker's job concurrency.
const WRITERS: usize = 64;
/// A naive full-fleet run longer than this (estimated from the subset) is not run.
const NAIVE_FULL_BUDGET: Duration = Duration::from_secs(120);

struct Sizes {
    servers: usize,
    keys: usize,
    subset: usize,
    rows: usize,
    rounds: usize,
}

impl Sizes {
    fn from_env() -> anyhow::Result<Self> {
        let get = |name: &str, default: usize| -> anyhow::Result<usize> {
            match std::env::var(name) {
                Ok(v) => v
                    .parse()
                    .with_context(|| format!("{name}={v:?} is not a number")),
                Err(_) => Ok(default),
            }
        };
        let sizes = Self {
            servers: get("KF_BENCH_SERVERS", 100)?,
            keys: get("KF_BENCH_KEYS", 10_000)?,
            subset: get("KF_BENCH_SUBSET", 5)?,
            rows: get("KF_BENCH_ROWS", 20_000)?,
            rounds: get("KF_BENCH_ROUNDS", 3)?,
        };
        ensure!(
            sizes.servers >= 1
                && (1..=sizes.servers).contains(&sizes.subset)
                && sizes.keys >= 1
                && sizes.rows >= 1
                && sizes.rounds >= 1,
            "sizes must be positive and the subset at most the fleet"
        );
        Ok(sizes)
    }
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench())
}

async fn bench() -> anyhow::Result<()> {
    let sizes = Sizes::from_env()?;
    let db = BenchDatabase::create().await?;
    println!(
        "Bench database {} on 127.0.0.1 (dropped at the end).",
        db.name
    );
    // Drop the database whatever happens, a panic included.
    let outcome = std::panic::AssertUnwindSafe(run(
        sizes,
        db.url.clone(),
        db.name.clone(),
        db.admin.clone(),
    ))
    .catch_unwind()
    .await;
    let dropped = db.drop().await;
    match outcome {
        Ok(result) => result?,
        Err(_) => bail!("the benchmark panicked"),
    }
    dropped?;
    Ok(())
}

fn sub(n: usize) -> SubscriptionId {
    SubscriptionId::parse(&format!("s{n:06}")).expect("a valid subscription id")
}

/// The SQL spelling of [`sub`].
const SUB_SQL: &str = "'s' || lpad(g::text, 6, '0')";

async fn run(sizes: Sizes, url: String, database: String, admin: Store) -> anyhow::Result<()> {
    let seed_started = Instant::now();
    let store = Store::connect(&url, 4).await?;
    store.migrate().await?;
    let subscriptions = sizes.keys.max(sizes.rows);
    store
        .execute_admin(&format!(
            "INSERT INTO subscriptions (id) SELECT {SUB_SQL} FROM generate_series(1, {subscriptions}) g"
        ))
        .await?;

    // The fleet: every server holds `keys` users with keyfleet's names, and Postgres the same keys
    // as active with the server's ids: an in-sync fleet.
    let fleet = FakeFleet::start(sizes.servers, 0, |_, i| {
        FakeServerConfig::v2ray().with_seed(i as u64)
    })
    .await?;
    let emails: Vec<String> = (1..=sizes.keys)
        .map(|n| keyfleet_core::owned_v2ray_email(&sub(n)))
        .collect();
    let mut servers = Vec::with_capacity(sizes.servers);
    for (i, fake) in fleet.servers.iter().enumerate() {
        let server = store
            .add_server(&NewServer {
                name: format!("bench-{i:03}"),
                kind: ServerKind::V2ray,
                api_url: fake.api_url(),
                api_key: fake.api_key(),
                cert_sha256: None,
                max_in_flight: 4,
                grpc: None,
                key_secret: None,
            })
            .await?;
        let ids: Vec<String> = emails.iter().map(|e| fake.add_foreign_user(e)).collect();
        sqlx::query(&format!(
            "INSERT INTO keys (subscription_id, server_id, state, server_key_id, link, config_synced_at, config_generation)
             SELECT {SUB_SQL}, $1, 'active', u.id, 'vless://' || u.id || '@127.0.0.1:443', now(), 1
             FROM UNNEST($2::text[]) WITH ORDINALITY AS u(id, g)"
        ))
        .bind(server.id.0)
        .bind(&ids)
        .execute(store.pool())
        .await?;
        servers.push(server.id);
    }
    // Two servers that are never contacted, whose `rows` pending keys the write-back phases fill.
    let mut writeback_servers = vec![];
    for name in [
        "bench-writeback-batched",
        "bench-writeback-naive",
        "bench-writeback-window",
    ] {
        let server = store
            .add_server(&NewServer {
                name: name.into(),
                kind: ServerKind::V2ray,
                api_url: "http://127.0.0.1:9".into(),
                api_key: Some("unused".into()),
                cert_sha256: None,
                max_in_flight: 4,
                grpc: None,
                key_secret: None,
            })
            .await?;
        store
            .execute_admin(&format!(
                "INSERT INTO keys (subscription_id, server_id, state, enqueued_at)
                 SELECT {SUB_SQL}, {}, 'pending', now() FROM generate_series(1, {}) g",
                server.id.0, sizes.rows
            ))
            .await?;
        writeback_servers.push(server.id);
    }
    // Autovacuum would add its own transactions to the commit count of phase (b).
    for table in ["keys", "servers", "subscriptions"] {
        store
            .execute_admin(&format!(
                "ALTER TABLE {table} SET (autovacuum_enabled = off)"
            ))
            .await?;
    }
    store.execute_admin("VACUUM ANALYZE").await?;
    flush_stats(store.pool()).await?;
    store.pool().close().await;
    println!(
        "Seeded {} servers x {} keys (fakes and Postgres), {} + {} pending rows for write-back in {:.1} s.",
        sizes.servers,
        sizes.keys,
        sizes.rows,
        sizes.rows,
        seed_started.elapsed().as_secs_f64()
    );

    let reconcile = reconcile_phase(&sizes, &url, &fleet, &servers).await?;
    let writeback = writeback_phase(&sizes, &url, &database, &admin, &writeback_servers).await?;
    fleet.shutdown().await;
    print_report(&sizes, &reconcile, &writeback);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (a) Reconcile

struct Timed {
    secs: Vec<f64>,
    requests: u64,
}

impl Timed {
    fn sorted(&self) -> Vec<f64> {
        let mut s = self.secs.clone();
        s.sort_by(f64::total_cmp);
        s
    }
    fn median(&self) -> f64 {
        let s = self.sorted();
        s[s.len() / 2]
    }
    fn min(&self) -> f64 {
        self.sorted()[0]
    }
    fn max(&self) -> f64 {
        *self.sorted().last().unwrap()
    }
}

struct ReconcileFigures {
    keyfleet_full: Timed,
    keyfleet_subset: Timed,
    naive_subset: Timed,
    /// Measured on the whole fleet, when the estimate fitted the budget.
    naive_full: Option<Timed>,
    naive_full_estimate_secs: f64,
    /// One server alone, median seconds: `stored_keys`, `list_keys`, `diff`.
    one_server: [f64; 3],
}

async fn reconcile_phase(
    sizes: &Sizes,
    url: &str,
    fleet: &FakeFleet,
    servers: &[ServerId],
) -> anyhow::Result<ReconcileFigures> {
    let store = Store::connect(url, SERVER_CONCURRENCY as u32).await?;
    // The worker's pool of one client per server, built from the servers' rows (warm, as in a
    // running worker).
    let clients = ServerClients::new(store.clone(), ClientConfig::default());
    let mut by_server = Vec::with_capacity(servers.len());
    for &id in servers {
        by_server.push((id, clients.get(id).await.map_err(anyhow::Error::msg)?));
    }
    let subset = &by_server[..sizes.subset];
    let mut keyfleet_full = Timed {
        secs: vec![],
        requests: 0,
    };
    let mut keyfleet_subset = Timed {
        secs: vec![],
        requests: 0,
    };
    let mut naive_subset = Timed {
        secs: vec![],
        requests: 0,
    };
    for round in 0..sizes.rounds {
        let (secs, requests, keys) =
            measure(fleet, keyfleet_way(&store, &by_server, sizes.keys)).await?;
        ensure!(keys == (sizes.servers * sizes.keys) as u64);
        keyfleet_full.secs.push(secs);
        keyfleet_full.requests = requests;
        let (secs, requests, _) = measure(fleet, keyfleet_way(&store, subset, sizes.keys)).await?;
        keyfleet_subset.secs.push(secs);
        keyfleet_subset.requests = requests;
        let (secs, requests, links) = measure(fleet, naive_way(&store, subset)).await?;
        ensure!(links == (sizes.subset * sizes.keys) as u64);
        naive_subset.secs.push(secs);
        naive_subset.requests = requests;
        println!(
            "  round {}: keyfleet {} servers {:.3} s ({} requests); keyfleet {} servers {:.3} s; naive {} servers {:.3} s ({} requests)",
            round + 1,
            sizes.servers,
            keyfleet_full.secs[round],
            keyfleet_full.requests,
            sizes.subset,
            keyfleet_subset.secs[round],
            sizes.subset,
            naive_subset.secs[round],
            naive_subset.requests,
        );
    }
    // Where keyfleet's time goes: one server alone, each step `rounds` times.
    let mut steps: [Vec<f64>; 3] = Default::default();
    let (id, client) = &by_server[0];
    for _ in 0..sizes.rounds {
        let t = Instant::now();
        let stored = store.stored_keys(*id).await?;
        steps[0].push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let remote = client.list_keys().await?;
        steps[1].push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let plan = reconcile::diff(&stored, &remote);
        steps[2].push(t.elapsed().as_secs_f64());
        ensure!(plan.is_empty());
    }
    let one_server = steps.map(|secs| Timed { secs, requests: 0 }.median());
    // Requests of the naive way are one per key by construction; its time scales with them.
    let naive_full_estimate_secs =
        naive_subset.median() * (sizes.servers as f64 / sizes.subset as f64);
    let naive_full = if sizes.subset == sizes.servers {
        None
    } else if naive_full_estimate_secs <= NAIVE_FULL_BUDGET.as_secs_f64() {
        let (secs, requests, links) = measure(fleet, naive_way(&store, &by_server)).await?;
        ensure!(links == (sizes.servers * sizes.keys) as u64);
        println!("  naive, whole fleet: {secs:.3} s ({requests} requests)");
        Some(Timed {
            secs: vec![secs],
            requests,
        })
    } else {
        println!(
            "  naive, whole fleet: not run (estimated {naive_full_estimate_secs:.0} s > {} s budget)",
            NAIVE_FULL_BUDGET.as_secs()
        );
        None
    };
    flush_stats(store.pool()).await?;
    store.pool().close().await;
    Ok(ReconcileFigures {
        keyfleet_full,
        keyfleet_subset,
        naive_subset,
        naive_full,
        naive_full_estimate_secs,
        one_server,
    })
}

/// Runs `work` with the fleet's meters zeroed: (seconds, requests the servers received, its result).
async fn measure(
    fleet: &FakeFleet,
    work: impl Future<Output = anyhow::Result<u64>>,
) -> anyhow::Result<(f64, u64, u64)> {
    fleet.servers.iter().for_each(|s| s.reset_meter());
    let started = Instant::now();
    let result = work.await?;
    let secs = started.elapsed().as_secs_f64();
    Ok((secs, fleet.total_meter().total_requests, result))
}

/// keyfleet's reconcile of each server (what `Executor::reconcile` does before it enqueues the
/// differences): Postgres's keys, one list request, the diff. Returns the keys found in sync.
async fn keyfleet_way(
    store: &Store,
    servers: &[(ServerId, VpnClient)],
    keys: usize,
) -> anyhow::Result<u64> {
    let in_sync: Vec<usize> = stream::iter(servers)
        .map(|(id, client)| async move {
            let stored = store.stored_keys(*id).await?;
            let remote = client.list_keys().await?;
            let plan = reconcile::diff(&stored, &remote);
            ensure!(
                plan.is_empty() && plan.foreign == 0 && remote.len() == keys,
                "server {id} is not in sync: {} remote, {} stored, plan {:?}",
                remote.len(),
                stored.len(),
                (
                    plan.create.len(),
                    plan.adopt.len(),
                    plan.delete.len(),
                    plan.foreign
                )
            );
            Ok(stored.len())
        })
        .buffer_unordered(SERVER_CONCURRENCY)
        .try_collect()
        .await?;
    Ok(in_sync.iter().sum::<usize>() as u64)
}

/// The seed's sync: every key's link fetched again (`GET /api/keys/{uuid}/link`), with the same
/// number of requests in flight as keyfleet's way has servers (the seed runs them one by one).
/// Returns the links fetched.
async fn naive_way(store: &Store, servers: &[(ServerId, VpnClient)]) -> anyhow::Result<u64> {
    let stored: Vec<(VpnClient, Vec<String>)> = stream::iter(servers)
        .map(|(id, client)| async move {
            let ids = store
                .stored_keys(*id)
                .await?
                .into_iter()
                .filter_map(|k| k.server_key_id)
                .collect::<Vec<_>>();
            anyhow::Ok((client.clone(), ids))
        })
        .buffer_unordered(SERVER_CONCURRENCY)
        .try_collect()
        .await?;
    let calls = stored
        .iter()
        .flat_map(|(client, ids)| ids.iter().map(move |id| (client, id)));
    let fetched = stream::iter(calls)
        .map(|(client, id)| async move {
            let link = client.fetch_link(id).await?;
            ensure!(link.starts_with("vless://"), "not a link");
            anyhow::Ok(())
        })
        .buffer_unordered(SERVER_CONCURRENCY)
        .try_fold(0u64, |n, ()| async move { Ok(n + 1) })
        .await?;
    Ok(fetched)
}

// ---------------------------------------------------------------------------------------------
// (b) Write-back

struct WriteFigures {
    label: &'static str,
    rows: usize,
    secs: f64,
    commits: i64,
    /// Cross-check of `commits`: distinct `updated_at` (`now()`, the transaction's start) over the
    /// rows written.
    transactions: i64,
}

impl WriteFigures {
    fn rows_per_sec(&self) -> f64 {
        self.rows as f64 / self.secs
    }
    fn commits_per_1000(&self) -> f64 {
        self.commits as f64 * 1000.0 / self.rows as f64
    }
}

async fn writeback_phase(
    sizes: &Sizes,
    url: &str,
    database: &str,
    admin: &Store,
    servers: &[ServerId],
) -> anyhow::Result<Vec<WriteFigures>> {
    let (batched_server, naive_server, window_server) = (servers[0], servers[1], servers[2]);
    let nobody = SubscriptionId::parse("nobody").expect("valid");
    let mut figures = vec![];
    figures.push(
        batched(
            sizes,
            url,
            database,
            admin,
            batched_server,
            true,
            "keyfleet: WriteBack as the worker runs it",
        )
        .await?,
    );

    // Naive: one UPDATE per row, each its own transaction, 64 at a time on 64 connections.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(WRITERS as u32)
        .min_connections(WRITERS as u32)
        .acquire_timeout(Duration::from_secs(30))
        .connect(url)
        .await?;
    {
        // Warm every connection: the statement is prepared on each before the clock starts.
        let mut held = vec![];
        for _ in 0..WRITERS {
            held.push(pool.acquire().await?);
        }
        for conn in &mut held {
            naive_update(&mut **conn, &nobody, naive_server, 0).await?;
        }
    }
    flush_stats(&pool).await?;
    let before = commits(admin.pool(), database).await?;
    let started = Instant::now();
    let applied = concurrent_writers(sizes.rows, Arc::default(), {
        let pool = pool.clone();
        move |n| {
            let pool = pool.clone();
            async move { naive_update(&pool, &sub(n), naive_server, n as i64).await }
        }
    })
    .await?;
    let secs = started.elapsed().as_secs_f64();
    let flushes = flush_stats(&pool).await?;
    let after = commits(admin.pool(), database).await? - flushes;
    pool.close().await;
    ensure!(
        applied == sizes.rows,
        "naive updates applied {applied} of {}",
        sizes.rows
    );
    figures.push(WriteFigures {
        label: "naive: UPDATE + commit per row",
        rows: sizes.rows,
        secs,
        commits: after - before,
        transactions: 0,
    });

    // Not what the worker runs: `WriteBack::spawn`, which knows nothing of the jobs held, so every
    // batch waits for the whole window.
    figures.push(
        batched(
            sizes,
            url,
            database,
            admin,
            window_server,
            false,
            "WriteBack::spawn, window only (no contributors)",
        )
        .await?,
    );

    // Every way wrote every row as the worker would have; and the transactions that wrote them
    // (one `now()` each) cross-check the commit counts.
    let check = Store::connect(url, 1).await?;
    for (figure, server) in figures
        .iter_mut()
        .zip([batched_server, naive_server, window_server])
    {
        let (active, transactions): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT updated_at) FROM keys
             WHERE server_id = $1 AND state = 'active' AND link IS NOT NULL",
        )
        .bind(server.0)
        .fetch_one(check.pool())
        .await?;
        ensure!(
            active == sizes.rows as i64,
            "{}: {active} rows written",
            figure.label
        );
        figure.transactions = transactions;
    }
    check.pool().close().await;
    Ok(figures)
}

/// `rows` results through a `WriteBack` with the default config on a pool of 16 (the worker's),
/// told how many results could still join a batch (as the worker does) or not.
async fn batched(
    sizes: &Sizes,
    url: &str,
    database: &str,
    admin: &Store,
    server: ServerId,
    contributors: bool,
    label: &'static str,
) -> anyhow::Result<WriteFigures> {
    let store = Store::connect(url, 16).await?;
    // The worker counts the jobs it holds (their leases); here, the writers holding a row.
    let held = Arc::new(AtomicUsize::new(0));
    let counted: Option<Contributors> = contributors.then(|| {
        let held = Arc::clone(&held);
        Arc::new(move || held.load(Ordering::SeqCst)) as Contributors
    });
    let (writeback, task) =
        WriteBack::spawn_with(store.clone(), WriteBackConfig::default(), counted);
    // Warm: prepares the statement on the connection; writes nothing (no such key).
    let nobody = SubscriptionId::parse("nobody").expect("valid");
    writeback.write(created(&nobody, server, 0)).await?;
    flush_stats(store.pool()).await?;
    let before = commits(admin.pool(), database).await?;
    let started = Instant::now();
    let applied = concurrent_writers(sizes.rows, held, {
        let writeback = writeback.clone();
        move |n| {
            let writeback = writeback.clone();
            async move {
                Ok(writeback
                    .write(created(&sub(n), server, n as i64))
                    .await?
                    .is_applied())
            }
        }
    })
    .await?;
    let secs = started.elapsed().as_secs_f64();
    drop(writeback);
    task.await?;
    let flushes = flush_stats(store.pool()).await?;
    let after = commits(admin.pool(), database).await? - flushes;
    store.pool().close().await;
    ensure!(
        applied == sizes.rows,
        "{label}: applied {applied} of {}",
        sizes.rows
    );
    Ok(WriteFigures {
        label,
        rows: sizes.rows,
        secs,
        commits: after - before,
        transactions: 0,
    })
}

fn created(subscription: &SubscriptionId, server: ServerId, n: i64) -> KeyWrite {
    KeyWrite::Created {
        subscription: subscription.clone(),
        server,
        fence: n + 1,
        server_key_id: format!("uuid-{n}"),
        link: format!("vless://uuid-{n}@127.0.0.1:443?security=reality#kf-{subscription}"),
    }
}

/// `KeyWrite::Created` as a single-row statement (the same conditions as the batched one).
async fn naive_update<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    subscription: &SubscriptionId,
    server: ServerId,
    n: i64,
) -> anyhow::Result<bool> {
    let KeyWrite::Created {
        fence,
        server_key_id,
        link,
        ..
    } = created(subscription, server, n)
    else {
        unreachable!()
    };
    let done = sqlx::query(
        "UPDATE keys k SET state = 'active', server_key_id = $3, link = $4, config_synced_at = now(),
             config_generation = s.config_generation, last_error = NULL, fence = $5, updated_at = now()
         FROM servers s
         WHERE k.subscription_id = $1 AND k.server_id = $2 AND s.id = k.server_id AND k.fence <= $5
           AND k.state IN ('pending', 'active', 'failed')",
    )
    .bind(subscription.as_str())
    .bind(server.0)
    .bind(server_key_id)
    .bind(link)
    .bind(fence)
    .execute(executor)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// `WRITERS` tasks take rows 1..=`rows` in turn, like a worker's concurrent jobs; `held` counts the
/// rows taken and not yet written. Returns how many writes were applied.
async fn concurrent_writers<F, Fut>(
    rows: usize,
    held: Arc<AtomicUsize>,
    write: F,
) -> anyhow::Result<usize>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<bool>> + Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(1));
    let tasks: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (next, held, write) = (Arc::clone(&next), Arc::clone(&held), write.clone());
            tokio::spawn(async move {
                let mut applied = 0;
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n > rows {
                        return anyhow::Ok(applied);
                    }
                    held.fetch_add(1, Ordering::SeqCst);
                    let written = write(n).await;
                    held.fetch_sub(1, Ordering::SeqCst);
                    if written? {
                        applied += 1;
                    }
                }
            })
        })
        .collect();
    let mut applied = 0;
    for task in tasks {
        applied += task.await??;
    }
    Ok(applied)
}

/// Makes every open connection of `pool` report its statistics now (including the one transaction
/// this takes on each, in the simple protocol: nothing to prepare) rather than up to 10 s later.
/// Returns the connections flushed, i.e. the transactions it added.
async fn flush_stats(pool: &PgPool) -> anyhow::Result<i64> {
    let mut held = vec![];
    for _ in 0..pool.size() {
        held.push(pool.acquire().await?);
    }
    for conn in &mut held {
        sqlx::raw_sql("SELECT pg_stat_force_next_flush()")
            .execute(&mut **conn)
            .await?;
    }
    Ok(held.len() as i64)
}

/// Transactions committed in `database` so far, once the count has not moved for a second. Every
/// connection to it has either exited (a backend flushes its statistics on exit) or been flushed
/// with [`flush_stats`]; otherwise an idle backend's statistics can arrive up to 10 s late.
async fn commits(admin: &PgPool, database: &str) -> anyhow::Result<i64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    let mut stable_since = Instant::now();
    loop {
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(admin)
            .await?;
        let n: i64 =
            sqlx::query_scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = $1")
                .bind(database)
                .fetch_one(admin)
                .await?;
        if last != Some(n) {
            (last, stable_since) = (Some(n), Instant::now());
        } else if stable_since.elapsed() >= Duration::from_secs(1) {
            return Ok(n);
        }
        ensure!(
            Instant::now() < deadline,
            "xact_commit of {database} did not settle within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Report

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn print_report(sizes: &Sizes, r: &ReconcileFigures, w: &[WriteFigures]) {
    let (n, s, k) = (sizes.servers, sizes.subset, sizes.keys);
    println!();
    println!(
        "(a) Reconcile, in-sync fleet: {n} V2Ray servers x {} keys, zero-latency fakes in this process, {SERVER_CONCURRENCY} in flight; {} rounds, seconds as median [min-max]",
        thousands(k as u64),
        sizes.rounds
    );
    println!("| way | servers x keys | requests | seconds | requests/s | keys/s | per key |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    let row = |way: &str, servers: usize, t: &Timed| {
        let keys = (servers * k) as f64;
        println!(
            "| {way} | {servers} x {} | {} | {:.3} [{:.3}-{:.3}] | {} | {} | {:.2} µs |",
            thousands(k as u64),
            thousands(t.requests),
            t.median(),
            t.min(),
            t.max(),
            thousands((t.requests as f64 / t.median()) as u64),
            thousands((keys / t.median()) as u64),
            t.median() / keys * 1e6
        );
    };
    row("keyfleet: list + stored_keys + diff", n, &r.keyfleet_full);
    row("keyfleet: list + stored_keys + diff", s, &r.keyfleet_subset);
    row("naive: GET link per key (measured)", s, &r.naive_subset);
    match &r.naive_full {
        Some(t) => row("naive: GET link per key (measured)", n, t),
        None => println!(
            "| naive: GET link per key (**extrapolated** from the {s}-server run) | {n} x {} | {} | ~{:.0} | - | - | - |",
            thousands(k as u64),
            thousands((n * k) as u64),
            r.naive_full_estimate_secs
        ),
    }
    println!();
    println!(
        "Requests, naive / keyfleet: {:.0}x over the whole fleet ({} / {}, exact: one per key vs one per server).",
        (n * k) as f64 / r.keyfleet_full.requests as f64,
        thousands((n * k) as u64),
        r.keyfleet_full.requests
    );
    println!(
        "Time, naive / keyfleet on the same {s} servers (measured): {:.0}x.",
        r.naive_subset.median() / r.keyfleet_subset.median()
    );
    match &r.naive_full {
        Some(t) => println!(
            "Time, naive / keyfleet on the whole fleet (measured): {:.0}x.",
            t.median() / r.keyfleet_full.median()
        ),
        None => println!(
            "Time, naive (extrapolated) / keyfleet (measured) on the whole fleet: ~{:.0}x.",
            r.naive_full_estimate_secs / r.keyfleet_full.median()
        ),
    }
    let [pg, list, diff] = r.one_server.map(|s| s * 1e3);
    println!(
        "keyfleet on one server alone ({} keys), median: stored_keys {pg:.1} ms, list_keys {list:.1} ms, diff {diff:.1} ms.",
        thousands(k as u64)
    );
    println!();
    println!(
        "(b) Write-back of {} KeyWrite::Created results, {WRITERS} concurrent writers; commits from pg_stat_database.xact_commit",
        thousands(sizes.rows as u64)
    );
    println!(
        "| way | rows | seconds | rows/s | commits | commits per 1,000 rows | writing transactions |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for f in w {
        println!(
            "| {} | {} | {:.3} | {} | {} | {:.1} | {} |",
            f.label,
            thousands(f.rows as u64),
            f.secs,
            thousands(f.rows_per_sec() as u64),
            thousands(f.commits as u64),
            f.commits_per_1000(),
            thousands(f.transactions as u64)
        );
    }
    if let [batched, naive, window] = w {
        println!();
        println!(
            "Rows/s, keyfleet / naive: {:.2}x; commits, naive / keyfleet: {:.0}x.",
            batched.rows_per_sec() / naive.rows_per_sec(),
            naive.commits as f64 / batched.commits as f64
        );
        println!(
            "Window only: rows/s {:.2}x naive, {:.2}x keyfleet as the worker runs it; commits per 1,000 rows {:.1}.",
            window.rows_per_sec() / naive.rows_per_sec(),
            window.rows_per_sec() / batched.rows_per_sec(),
            window.commits_per_1000()
        );
    }
}
