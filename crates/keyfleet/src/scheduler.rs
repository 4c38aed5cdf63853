//! `keyfleet scheduler`: fires each sweep on its cron schedule, exactly once per tick across any
//! number of replicas. The tick is claimed in Postgres (one row per sweep and tick); a sweep runs
//! under a transaction-scoped advisory lock, so a slow run is never started twice at once; ticks
//! missed while no scheduler ran are caught up once (see `schedule::Schedule::due`).

use std::{future::Future, net::SocketAddr, time::Duration};

use chrono::Utc;
use keyfleet_queue::Queue;
use keyfleet_store::Store;

use crate::{
    observe::{self, Health},
    recovery,
    schedule::Schedule,
    settings::Settings,
    sweeps::{self, Sweep},
};

pub struct Scheduler {
    pub store: Store,
    pub queue: Queue,
    pub settings: Settings,
    pub schedules: Vec<(Sweep, Schedule)>,
    /// Unique per process (shows in `sweep_ticks.fired_by` and logs).
    pub id: String,
    /// Serve `/metrics`, `/healthz` and `/readyz` here (`--metrics-listen`); `None`: no listener.
    pub metrics_listen: Option<SocketAddr>,
}

impl Scheduler {
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.schedules.is_empty(),
            "every sweep is off: nothing to schedule"
        );
        let metrics = observe::start(
            self.metrics_listen,
            Health {
                store: self.store.clone(),
                queue: self.queue.clone(),
                claim_progress: None,
            },
        )
        .await?;
        self.fire_until(shutdown).await;
        if let Some(metrics) = metrics {
            metrics.stop().await;
        }
        Ok(())
    }

    async fn fire_until(&self, shutdown: impl Future<Output = ()>) {
        for warning in self.queue.settings_warnings().await {
            tracing::warn!("{warning}.");
        }
        let started = Utc::now();
        tracing::info!(id = %self.id, sweeps = ?self.schedules.iter().map(|(s, _)| s.name()).collect::<Vec<_>>(), "Scheduler started.");
        tokio::pin!(shutdown);
        loop {
            self.recover_if_redis_lost().await;
            let now = Utc::now();
            for (sweep, schedule) in &self.schedules {
                if let Err(error) = self.fire_if_due(*sweep, schedule, started, now).await {
                    tracing::warn!(
                        sweep = sweep.name(),
                        error = format!("{error:#}"),
                        "Sweep tick failed; next tick will try again."
                    );
                }
            }
            let now = Utc::now();
            let next = self
                .schedules
                .iter()
                .filter_map(|(_, s)| s.next_after(now))
                .min();
            let wait = next
                .and_then(|t| (t - now).to_std().ok())
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            tokio::select! {
                () = &mut shutdown => {
                    tracing::info!("Scheduler stopped.");
                    return;
                }
                () = tokio::time::sleep(wait + Duration::from_millis(5)) => {}
            }
        }
    }

    /// A Redis that lost keyfleet's state is re-filled from Postgres at once, even while no
    /// worker runs (a worker's first claim would do the same).
    async fn recover_if_redis_lost(&self) {
        match self.queue.is_initialized().await {
            Ok(true) => {}
            Ok(false) => {
                if let Err(error) =
                    recovery::initialize(&self.store, &self.queue, &self.settings).await
                {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "Cannot re-derive work from Postgres yet; retrying."
                    );
                }
            }
            Err(error) => tracing::warn!(%error, "Cannot reach Redis; retrying."),
        }
    }

    async fn fire_if_due(
        &self,
        sweep: Sweep,
        schedule: &Schedule,
        started: chrono::DateTime<Utc>,
        now: chrono::DateTime<Utc>,
    ) -> anyhow::Result<()> {
        let last = self.store.last_tick(sweep.name()).await?;
        let Some(tick) = schedule.due(last, started, now) else {
            return Ok(());
        };
        let mut lock = self.store.pool().begin().await?;
        let locked: bool = sqlx_try_lock(&mut lock, sweep.name()).await?;
        if !locked {
            tracing::info!(sweep = sweep.name(), %tick, "Sweep still running elsewhere; not starting it again.");
            return Ok(());
        }
        // The tick's claim commits with the sweep: a sweep that fails rolls it back, and the tick
        // is tried again (its enqueues are idempotent, so a partial run is never doubled).
        if !self
            .store
            .claim_tick(&mut lock, sweep.name(), tick, &self.id)
            .await?
        {
            return Ok(());
        }
        let run_started = std::time::Instant::now();
        let report = sweeps::run(
            &self.store,
            &self.queue,
            sweep,
            None,
            self.settings.config_ttl,
        )
        .await?;
        tracing::info!(sweep = sweep.name(), %tick, jobs = report.jobs.values().sum::<usize>(), enqueued = report.enqueued, "Sweep fired.");
        let findings = keyfleet_store::TickFindings {
            jobs: report
                .jobs
                .iter()
                .map(|(server, n)| (server.clone(), *n as u64))
                .collect(),
            enqueued: report.enqueued as u64,
            cancelled: report.cancelled,
            duration_ms: run_started.elapsed().as_millis() as u64,
        };
        self.store
            .record_tick(&mut lock, sweep.name(), tick, &findings)
            .await?;
        lock.commit().await?;
        let name = sweep.name();
        metrics::counter!(observe::SWEEP_RUNS_METRIC, "sweep" => name).increment(1);
        metrics::histogram!(observe::SWEEP_DURATION_METRIC, "sweep" => name)
            .record(run_started.elapsed().as_secs_f64());
        metrics::counter!(observe::SWEEP_ENQUEUED_METRIC, "sweep" => name)
            .increment(report.enqueued as u64);
        Ok(())
    }
}

async fn sqlx_try_lock(tx: &mut keyfleet_store::Transaction, name: &str) -> anyhow::Result<bool> {
    Ok(keyfleet_store::try_advisory_xact_lock(tx, &format!("keyfleet-sweep:{name}")).await?)
}
