//! The worker process: apalis's worker runtime over keyfleet's queue backend, plus the lease
//! maintenance, the wake-up listener and the batched write-back.

mod executor;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use apalis_core::worker::builder::WorkerBuilder;
use futures::future::BoxFuture;
use keyfleet_core::{JobPayload, ServerId};
use keyfleet_queue::{
    BuriedJob, ClaimHooks, Handoff, LeaseRegistry, ProbeOutcome, Queue, QueueBackend, WakeSignal,
    spawn_maintenance_with,
};
use keyfleet_store::{KeyWrite, Store, WriteBack, WriteBackConfig};
use keyfleet_vpn::ClientConfig;
use tower::limit::ConcurrencyLimitLayer;

pub use executor::{Executor, enqueue_tolerating_duplicates, execute, requeue_failed_keys};

use crate::{
    observe::{self, Health, Progress},
    recovery,
    servers::{ServerClients, apply_to_queue},
    settings::Settings,
};

/// Concurrency served by one claim loop, and the most claim loops a process runs.
const JOBS_PER_CLAIMER: usize = 8;
const MAX_CLAIMERS: usize = 8;

/// How many claim loops (apalis workers over the queue backend) a process with this concurrency
/// runs.
pub fn claim_loops(concurrency: usize) -> usize {
    concurrency
        .div_ceil(JOBS_PER_CLAIMER)
        .clamp(1, MAX_CLAIMERS)
}

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Jobs this process runs at once (each holds one per-server slot while it runs).
    pub concurrency: usize,
    /// Unique per process: shows in leases and logs, so two replicas never collide.
    pub worker_id: String,
    /// Serve `/metrics`, `/healthz` and `/readyz` here (`--metrics-listen`); `None`: no listener.
    pub metrics_listen: Option<SocketAddr>,
}

impl WorkerOptions {
    pub fn new(concurrency: usize) -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into());
        let worker_id = format!(
            "{host}-{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        Self {
            concurrency,
            worker_id,
            metrics_listen: None,
        }
    }
}

/// Runs a worker until `shutdown` resolves, then stops claiming, lets in-flight jobs finish within
/// the grace period and returns.
pub async fn run(
    settings: Settings,
    options: WorkerOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    anyhow::ensure!(options.concurrency >= 1, "--concurrency must be at least 1");
    let store = settings.store().await?;
    let queue = settings.queue()?;
    let progress = Progress::default();
    let metrics = observe::start(
        options.metrics_listen,
        Health {
            store: store.clone(),
            queue: queue.clone(),
            claim_progress: Some(progress.clone()),
        },
    )
    .await?;
    observe::recorder();
    let rollups = observe::rollups().spawn_flusher(queue.clone());
    let servers = store.list_servers().await?;
    apply_to_queue(&queue, &servers).await?;
    for warning in queue.settings_warnings().await {
        tracing::warn!("{warning}.");
    }
    let leases = LeaseRegistry::default();
    let held = leases.clone();
    let (writeback, writeback_task) = WriteBack::spawn_with(
        store.clone(),
        WriteBackConfig::default(),
        Some(Arc::new(move || held.len())),
    );
    let maintenance = spawn_maintenance_with(
        queue.clone(),
        leases.clone(),
        record_buried(writeback.clone()),
    );
    let wake = WakeSignal::spawn(&queue);
    let client_config = ClientConfig {
        request_timeout: settings.request_timeout,
        ..ClientConfig::default()
    };
    let clients = ServerClients::new(store.clone(), client_config);
    clients.preload(&servers);
    let refresher = tokio::spawn(
        clients
            .clone()
            .refresh_every(queue.clone(), settings.server_refresh),
    );
    let hooks: Arc<dyn ClaimHooks> = Arc::new(WorkerHooks(Arc::new(HooksInner {
        store: store.clone(),
        queue: queue.clone(),
        clients: clients.clone(),
        settings: settings.clone(),
        initializing: tokio::sync::Mutex::new(()),
        progress: progress.clone(),
    })));
    let handoff = Handoff::new(
        queue.clone(),
        options.worker_id.as_str(),
        wake,
        hooks,
        options.concurrency,
        leases.clone(),
    );
    let executor = Arc::new(Executor {
        store: store.clone(),
        queue: queue.clone(),
        handoff: handoff.clone(),
        writeback,
        clients,
        leases: leases.clone(),
        settings: settings.clone(),
        progress,
    });
    tracing::info!(worker = %options.worker_id, concurrency = options.concurrency, prefix = %settings.redis_prefix, "Worker started.");
    // One apalis worker claims one job at a time (a Redis round trip each), so a process runs
    // several, sharing the concurrency: claims then overlap instead of queueing behind each other.
    let claimers = claim_loops(options.concurrency);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let workers = (0..claimers).map(|i| {
        let share =
            options.concurrency / claimers + usize::from(i < options.concurrency % claimers);
        let name = format!("{}/{i}", options.worker_id);
        let worker = WorkerBuilder::new(name.as_str())
            .backend(QueueBackend::new(handoff.clone(), name.as_str()))
            .layer(ConcurrencyLimitLayer::new(share))
            .data(executor.clone())
            .build(execute);
        let mut stop = stop_rx.clone();
        worker.run_until(async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
            Ok::<(), std::io::Error>(())
        })
    });
    let running = futures::future::try_join_all(workers);
    tokio::pin!(running);
    tokio::select! {
        result = &mut running => { result?; }
        () = shutdown => {
            tracing::info!(in_flight = leases.len(), "Shutting down: no new claims; finishing in-flight jobs.");
            let _ = stop_tx.send(true);
            match tokio::time::timeout(settings.shutdown_grace, &mut running).await {
                Ok(result) => { result?; }
                Err(_) => tracing::warn!(
                    in_flight = leases.len(),
                    "Grace period over with jobs still running; their leases will expire and they will run again."
                ),
            }
        }
    }
    maintenance.abort();
    refresher.abort();
    drop(writeback_task);
    rollups.stop().await;
    if let Some(metrics) = metrics {
        metrics.stop().await;
    }
    tracing::info!("Worker stopped.");
    Ok(())
}

/// A create the reaper dead-lettered (its worker died on every attempt) is recorded on its key,
/// as the worker would have: `failed`, with the reason.
fn record_buried(writeback: WriteBack) -> impl Fn(BuriedJob) + Send + 'static {
    move |job| {
        tracing::warn!(job = %job.id, error = %job.error, "Job dead-lettered by the reaper.");
        if let Ok(JobPayload::CreateKey {
            server,
            subscription,
            ..
        }) = JobPayload::from_json(&job.payload)
        {
            let writeback = writeback.clone();
            tokio::spawn(async move {
                // Its workers kept dying: not the server's fault, and not worth retrying blindly.
                let write = KeyWrite::Failed {
                    subscription,
                    server,
                    fence: job.fence,
                    error: job.error,
                    transient: false,
                };
                if let Err(error) = writeback.write(write).await {
                    tracing::warn!(%error, "Could not record a reaped job's failure on its key.");
                }
            });
        }
    }
}

/// What a worker does when a claim hands back something other than a job: initialise a Redis
/// that lost its state (re-deriving the work from Postgres), or probe a server whose breaker is
/// open with one cheap health request.
struct WorkerHooks(Arc<HooksInner>);

struct HooksInner {
    store: Store,
    queue: Queue,
    clients: ServerClients,
    settings: Settings,
    /// One initialisation at a time per process: its claim loops all find Redis empty at once.
    initializing: tokio::sync::Mutex<()>,
    /// Ticked by every claim that returns, for readiness.
    progress: Progress,
}

impl ClaimHooks for WorkerHooks {
    fn claim_returned(&self) {
        self.0.progress.tick();
    }

    fn released(&self, job: &keyfleet_queue::ClaimedJob) {
        metrics::counter!(
            observe::JOB_OUTCOMES_METRIC,
            "server" => self.0.clients.name(job.server),
            "kind" => executor::job_kind(job),
            "outcome" => "released",
        )
        .increment(1);
    }

    fn initialize(&self) -> BoxFuture<'static, ()> {
        let inner = self.0.clone();
        Box::pin(async move {
            let _one_at_a_time = inner.initializing.lock().await;
            let mut delay = Duration::from_millis(100);
            loop {
                if let Ok(true) = inner.queue.is_initialized().await {
                    return;
                }
                match recovery::initialize(&inner.store, &inner.queue, &inner.settings).await {
                    Ok(_) => return,
                    Err(error) => {
                        tracing::warn!(
                            error = format!("{error:#}"),
                            "Cannot initialise Redis from Postgres yet; retrying."
                        );
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                }
            }
        })
    }

    fn probe(&self, server: ServerId) -> BoxFuture<'static, ()> {
        let inner = self.0.clone();
        Box::pin(async move {
            let health = match inner.clients.get(server).await {
                Ok(client) => client.health().await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match inner.queue.probe_result(server, health.is_ok()).await {
                Ok(ProbeOutcome::Closed) => {
                    tracing::info!(server_id = %server, "Health probe succeeded: circuit breaker closed.");
                    requeue_failed_keys(&inner.store, &inner.queue, server).await;
                }
                Ok(ProbeOutcome::StillOpen) => tracing::warn!(
                    server_id = %server,
                    error = health.err().unwrap_or_default(),
                    "Health probe failed: circuit breaker stays open for a longer cool-down."
                ),
                Ok(ProbeOutcome::Expired) => {}
                Err(error) => {
                    tracing::warn!(%error, server_id = %server, "Could not record a health probe; it will expire and run again.")
                }
            }
        })
    }
}
