//! `keyfleet demo`: the whole system on one machine. An embedded fake fleet (10 V2Ray + 1 Outline
//! with 50-150 ms latency), its own database and Redis prefix, in-process workers, 200 purchases,
//! live progress, and a summary read from Postgres and from the fake servers' own meters.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{StreamExt, stream};
use keyfleet_core::{ServerKind, SubscriptionId};
use keyfleet_fakevpn::{FakeFleet, FakeGrpcNode, FakeServerConfig, Latency, MeterSnapshot};
use keyfleet_store::Store;

use crate::{
    producer::Producer,
    schedule::Schedule,
    scheduler::Scheduler,
    servers::{GrpcInput, validate_new_server},
    settings::Settings,
    sweeps::Sweep,
    worker::{self, WorkerOptions},
};

#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// Subscriptions to provision (each gets one key per server).
    #[arg(long, default_value_t = 200)]
    pub subscriptions: usize,
    /// V2Ray servers in the fake fleet.
    #[arg(long, default_value_t = 10)]
    pub v2ray: usize,
    /// Outline servers in the fake fleet.
    #[arg(long, default_value_t = 1)]
    pub outline: usize,
    /// Fake Xray-core nodes driven over gRPC (`xray-grpc`) in the fake fleet.
    #[arg(long, default_value_t = 1)]
    pub xray_grpc: usize,
    /// Worker processes' worth of workers to run in-process.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Concurrency of each worker.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Fleet-wide in-flight limit per V2Ray server (Outline servers get half, at least 1).
    #[arg(long, default_value_t = 6)]
    pub max_in_flight: u32,
    /// Database the demo (re)creates on the DATABASE_URL server; it never touches the main one.
    #[arg(long, default_value = "keyfleet_demo")]
    pub database: String,
    /// Give up if the keys are not all in Postgres after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// Then leave the dashboard (`/ui`) up on the demo's data, with its fleet and workers
    /// running, until Ctrl-C; prints the dashboard's URL and an admin token for it.
    #[arg(long)]
    pub serve: bool,
    /// Where `--serve` listens (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:8080", requires = "serve")]
    pub listen: std::net::SocketAddr,
}

pub async fn run(
    settings: Settings,
    options: DemoOptions,
    shutdown: Option<impl std::future::Future<Output = ()> + Send + 'static>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        options
            .database
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !options.database.is_empty(),
        "--database {:?}: use letters, digits and '_'",
        options.database
    );
    let mut settings = settings;
    settings.database_url = fresh_database(&settings.database_url, &options.database).await?;
    settings.redis_prefix = format!("{}:demo", settings.redis_prefix);
    let store = settings.store().await?;
    store.migrate().await?;
    let queue = settings.queue()?;
    queue
        .purge()
        .await
        .context("cannot reach Redis (REDIS_URL)")?;

    println!(
        "Starting a fake fleet of {} V2Ray + {} Outline servers (latency 50-150 ms, heavy tail) + {} Xray gRPC nodes...",
        options.v2ray, options.outline, options.xray_grpc
    );
    let fleet = FakeFleet::start(options.v2ray, options.outline, |kind, i| {
        let config = match kind {
            ServerKind::V2ray => FakeServerConfig::v2ray(),
            ServerKind::Outline | ServerKind::XrayGrpc => FakeServerConfig::outline(),
        };
        config
            .with_latency(Latency::HeavyTail {
                median: Duration::from_millis(70),
                p99: Duration::from_millis(150),
                max: Duration::from_millis(400),
            })
            .with_seed(i as u64 + 1)
    })
    .await?;
    let mut names = Vec::new();
    for (i, fake) in fleet.servers.iter().enumerate() {
        let name = format!("{}-{}", fake.kind(), i + 1);
        let limit = match fake.kind() {
            ServerKind::V2ray => options.max_in_flight,
            ServerKind::Outline | ServerKind::XrayGrpc => (options.max_in_flight / 2).max(1),
        };
        let new = validate_new_server(
            &name,
            fake.kind().as_str(),
            &fake.api_url(),
            fake.api_key().as_deref(),
            fake.cert_sha256().as_deref(),
            limit,
            None,
        )?;
        store.add_server(&new).await?;
        names.push(name);
    }
    let mut nodes = Vec::new();
    for i in 0..options.xray_grpc {
        let node = FakeGrpcNode::start("vless-in").await?;
        let name = format!("xray-grpc-{}", i + 1);
        let grpc = GrpcInput {
            inbound_tag: Some(node.inbound_tag().to_owned()),
            grpc_api: Some("xray".into()),
            link_address: Some(format!("{name}.example.net")),
            link_port: Some(443),
            ..GrpcInput::default()
        };
        let limit = options.max_in_flight;
        let new = validate_new_server(
            &name,
            "xray-grpc",
            &node.api_url(),
            None,
            None,
            limit,
            Some(&grpc),
        )?;
        store.add_server(&new).await?;
        names.push(name);
        nodes.push(node);
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for _ in 0..options.workers {
        let mut stop = stop_rx.clone();
        let settings = settings.clone();
        let options = WorkerOptions::new(options.concurrency);
        workers.push(tokio::spawn(async move {
            worker::run(settings, options, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
        }));
    }

    let producer = Producer::new(store.clone(), queue.clone());
    let expected = (options.subscriptions * (fleet.servers.len() + nodes.len())) as i64;
    println!(
        "Provisioning {} subscriptions ({} keys) with {} workers x concurrency {}...",
        options.subscriptions, expected, options.workers, options.concurrency
    );
    let started = Instant::now();
    let purchases = stream::iter(0..options.subscriptions)
        .map(|i| {
            let producer = producer.clone();
            async move {
                let sub = SubscriptionId::parse(&format!("demo-{i:05}"))?;
                producer.provision(&sub, None).await
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>();
    let progress = async {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let active = store.count_keys_in_state("active").await.unwrap_or(-1);
            let q = queue.stats().await.unwrap_or_default();
            println!(
                "  {:>5.1}s  keys in Postgres {active:>5}/{expected}  queue: ready {:>5} running {:>3} retrying {:>3} dead {}",
                started.elapsed().as_secs_f64(),
                q.ready,
                q.running,
                q.delayed,
                q.dead
            );
            if active >= expected || q.dead > 0 && q.ready + q.running + q.delayed == 0 {
                return active;
            }
        }
    };
    let (receipts, active) = tokio::join!(purchases, async {
        tokio::time::timeout(Duration::from_secs(options.timeout_secs), progress).await
    });
    for receipt in receipts {
        receipt?;
    }
    let elapsed = started.elapsed();
    let meters = || -> Vec<MeterSnapshot> {
        fleet
            .servers
            .iter()
            .map(|f| f.meter())
            .chain(nodes.iter().map(FakeGrpcNode::meter))
            .collect()
    };
    if options.serve {
        println!("{}", summarise(&store, &meters(), &names).await?);
        serve(&settings, &store, options.listen, shutdown).await?;
    }
    let _ = stop_tx.send(true);
    for w in workers {
        w.await??;
    }
    let meters = meters();
    let summary = summarise(&store, &meters, &names).await?;
    let total = MeterSnapshot {
        current_users: meters.iter().map(|m| m.current_users).sum(),
        creates_committed: meters.iter().map(|m| m.creates_committed).sum(),
        duplicates: meters.iter().map(|m| m.duplicates).sum(),
        ..MeterSnapshot::default()
    };
    fleet.shutdown().await;
    drop(nodes);
    queue.purge().await?;
    println!("{summary}");
    println!(
        "Done in {:.1}s: {} keys, {} create requests, {} duplicates on the servers.",
        elapsed.as_secs_f64(),
        total.current_users,
        total.creates_committed,
        total.duplicates
    );
    match active {
        Err(_) => bail!(
            "timed out after {}s before every key was in Postgres",
            options.timeout_secs
        ),
        Ok(active) if active != expected => {
            bail!("only {active} of {expected} keys reached Postgres")
        }
        Ok(_) if total.duplicates > 0 => {
            bail!("the servers saw {} duplicate creates", total.duplicates)
        }
        Ok(_) => Ok(()),
    }
}

/// `--serve`: the API and dashboard on the demo's database and Redis prefix, with an admin token
/// made for it, until `shutdown` resolves (Ctrl-C).
async fn serve(
    settings: &Settings,
    store: &Store,
    listen: std::net::SocketAddr,
    shutdown: Option<impl std::future::Future<Output = ()> + Send + 'static>,
) -> anyhow::Result<()> {
    let shutdown = shutdown.context("--serve runs until a signal, which was not set up")?;
    let (token, digest) = crate::api::auth::new_token();
    store.create_token("demo-admin", "admin", &digest).await?;
    let listener = crate::api::bind(listen).await?;
    let bound = listener.local_addr()?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "Dashboard: http://{bound}/ui  (the demo's data; Ctrl-C stops it)"
        )?;
        writeln!(out, "Admin token for it (demo only, shown once):")?;
        writeln!(out, "{token}")?;
        out.flush()?;
    }
    // A scheduler too, so the Sweeps page fills: reconcile every 30 s, configs and traffic each
    // minute.
    let mut schedules = Vec::new();
    for (sweep, expr) in [
        (Sweep::Reconcile, "*/30 * * * * *"),
        (Sweep::Configs, "15 * * * * *"),
        (Sweep::Traffic, "45 * * * * *"),
    ] {
        schedules.push((sweep, Schedule::parse(sweep.name(), expr)?));
    }
    let scheduler = Scheduler {
        store: store.clone(),
        queue: settings.queue()?,
        settings: settings.clone(),
        schedules,
        id: format!("demo-{}", std::process::id()),
        metrics_listen: None,
    };
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let sweeping = tokio::spawn(scheduler.run(async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    }));
    let served = crate::api::serve_on(
        settings.clone(),
        crate::api::ApiOptions::default(),
        listener,
        shutdown,
    )
    .await;
    let _ = stop_tx.send(true);
    sweeping.await??;
    served
}

/// Drops and recreates `database` on the server of `database_url`; returns the URL to it.
async fn fresh_database(database_url: &str, database: &str) -> anyhow::Result<String> {
    let admin = Store::connect(database_url, 1).await?;
    sqlx_execute(
        &admin,
        &format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"),
    )
    .await?;
    sqlx_execute(&admin, &format!("CREATE DATABASE {database}")).await?;
    let mut url = url::Url::parse(database_url).context("DATABASE_URL is not a URL")?;
    url.set_path(&format!("/{database}"));
    Ok(url.to_string())
}

async fn sqlx_execute(store: &Store, sql: &str) -> anyhow::Result<()> {
    store
        .execute_admin(sql)
        .await
        .with_context(|| format!("running {sql:?}"))
}

async fn summarise(
    store: &Store,
    meters: &[MeterSnapshot],
    names: &[String],
) -> anyhow::Result<String> {
    use std::fmt::Write;
    let counts = store.key_counts().await?;
    let latency = store.provision_latency().await?;
    let limits: Vec<i32> = store
        .list_servers()
        .await?
        .iter()
        .map(|s| s.max_in_flight)
        .collect();
    let mut out = String::new();
    writeln!(
        out,
        "\n{:<12} {:>6} {:>6} {:>8} {:>9} {:>10} {:>10} {:>6}",
        "server", "keys", "links", "creates", "requests", "peak/limit", "duplicates", "users"
    )?;
    let mut totals = (0i64, 0i64, 0u64, 0u64, 0u64);
    for (((m, name), count), limit) in meters.iter().zip(names).zip(&counts).zip(&limits) {
        writeln!(
            out,
            "{:<12} {:>6} {:>6} {:>8} {:>9} {:>10} {:>10} {:>6}",
            name,
            count.active,
            count.with_link,
            m.creates_committed,
            m.total_requests,
            format!("{}/{}", m.peak_in_flight, limit),
            m.duplicates,
            m.current_users
        )?;
        totals.0 += count.active;
        totals.1 += count.with_link;
        totals.2 += m.creates_committed;
        totals.3 += m.total_requests;
        totals.4 += m.duplicates;
    }
    writeln!(
        out,
        "{:<12} {:>6} {:>6} {:>8} {:>9} {:>10} {:>10}",
        "total", totals.0, totals.1, totals.2, totals.3, "", totals.4
    )?;
    writeln!(
        out,
        "\nenqueue -> key in Postgres over {} keys: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        latency.count, latency.p50_ms, latency.p99_ms, latency.max_ms
    )?;
    Ok(out)
}
