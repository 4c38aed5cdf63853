use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use tokio::{sync::watch, task::JoinHandle};

use crate::{BuriedJob, ClaimedJob, JobId, Queue};

/// The attempts this process holds leases on, keyed by (job, fence) so a job this process claims
/// again after losing it is a different lease. One heartbeat call extends them all; each attempt
/// learns when its lease is lost, or can no longer be known to be held, and stops.
#[derive(Clone, Default)]
pub struct LeaseRegistry {
    held: Arc<Mutex<HashMap<LeaseKey, watch::Sender<LeaseView>>>>,
}

/// A lease: the job and the fence of the attempt holding it.
type LeaseKey = (JobId, i64);

#[derive(Debug, Clone, Copy)]
struct LeaseView {
    /// Until when this process knows the lease is still held (a heartbeat confirmed it, minus a
    /// safety margin); past it, another worker may already own the job.
    confirmed_until: Instant,
    lost: bool,
}

/// Held while an attempt runs; removes the lease from the registry when dropped.
pub struct LeaseGuard {
    registry: LeaseRegistry,
    key: LeaseKey,
    view: watch::Receiver<LeaseView>,
}

impl LeaseRegistry {
    /// Registers the attempt's lease, known to last until `job.claimed_at + lease` less a margin.
    pub fn hold(&self, job: &ClaimedJob, lease: Duration) -> LeaseGuard {
        let key = (job.id, job.fence);
        let (tx, view) = watch::channel(LeaseView {
            confirmed_until: job.claimed_at + usable(lease),
            lost: false,
        });
        self.held.lock().insert(key, tx);
        LeaseGuard {
            registry: self.clone(),
            key,
            view,
        }
    }

    pub fn len(&self) -> usize {
        self.held.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn snapshot(&self) -> Vec<LeaseKey> {
        self.held.lock().keys().copied().collect()
    }

    /// A heartbeat sent at `sent_at` extended every lease in `extended` except those `lost`.
    /// Applies a heartbeat's answer to the attempts still held; returns the lost ones among them.
    /// An attempt that ended while the heartbeat was on its way (its job hash is gone because it
    /// finished) is no longer held: it is not lost.
    fn confirm(
        &self,
        extended: &[LeaseKey],
        lost: &[LeaseKey],
        sent_at: Instant,
        lease: Duration,
    ) -> Vec<LeaseKey> {
        let held = self.held.lock();
        let mut still_held_lost = Vec::new();
        for key in extended {
            let Some(tx) = held.get(key) else { continue };
            if lost.contains(key) {
                tx.send_modify(|v| v.lost = true);
                still_held_lost.push(*key);
            } else {
                tx.send_modify(|v| v.confirmed_until = sent_at + usable(lease));
            }
        }
        still_held_lost
    }
}

/// The part of a lease an attempt may rely on: a tenth is kept back for the heartbeat's round trip
/// and clock-rate differences between this host and Redis.
fn usable(lease: Duration) -> Duration {
    lease - lease / 10
}

impl LeaseGuard {
    /// Resolves when the lease is lost (a heartbeat said another attempt owns the job, or the job
    /// is gone) or when no heartbeat confirmed it in time (Redis unreachable): from then on the
    /// reaper may hand the job to another worker, so this attempt must stop.
    pub async fn lost(&self) {
        let mut view = self.view.clone();
        loop {
            let current = *view.borrow_and_update();
            if current.lost {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(current.confirmed_until.into()) => {
                    if view.borrow().confirmed_until <= Instant::now() {
                        return;
                    }
                }
                changed = view.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.registry.held.lock().remove(&self.key);
    }
}

/// Heartbeats this process's leases, takes back expired leases of dead workers and applies the
/// dead-set retention, every third of the lease time. Redis errors are logged and retried; the
/// task never ends on its own.
pub fn spawn_maintenance(queue: Queue, registry: LeaseRegistry) -> JoinHandle<()> {
    spawn_maintenance_with(queue, registry, |_| {})
}

/// Like [`spawn_maintenance`], calling `on_buried` for each job the reaper dead-lettered (its
/// worker died on every attempt), so the caller can record the failure the worker could not.
pub fn spawn_maintenance_with(
    queue: Queue,
    registry: LeaseRegistry,
    on_buried: impl Fn(BuriedJob) + Send + 'static,
) -> JoinHandle<()> {
    let lease = queue.config().lease;
    let period = lease / 3;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_trim: Option<Instant> = None;
        loop {
            tick.tick().await;
            let held = registry.snapshot();
            let sent_at = Instant::now();
            match queue.heartbeat(&held).await {
                Ok(lost) => {
                    let lost = registry.confirm(&held, &lost, sent_at, lease);
                    if !lost.is_empty() {
                        tracing::warn!(jobs = ?lost, "Lost leases; those attempts stop and will be fenced out.");
                    }
                }
                Err(error) => tracing::warn!(%error, "Heartbeat failed; retrying."),
            }
            loop {
                match queue.reap_expired(REAP_BATCH).await {
                    Ok((n, buried)) if n > 0 => {
                        metrics::counter!(LEASES_REAPED_METRIC).increment(n);
                        buried.into_iter().for_each(&on_buried);
                        tracing::info!(jobs = n, "Took back jobs whose worker lost its lease.");
                        if n < u64::from(REAP_BATCH) {
                            break;
                        }
                    }
                    Ok(_) => break,
                    Err(error) => {
                        tracing::warn!(%error, "Reaping expired leases failed; retrying.");
                        break;
                    }
                }
            }
            if last_trim.is_none_or(|t| t.elapsed() >= TRIM_EVERY) {
                match queue.trim_dead().await {
                    Ok(dropped) => {
                        last_trim = Some(Instant::now());
                        if dropped > 0 {
                            tracing::info!(dropped, "Dropped dead jobs past the retention.");
                        }
                    }
                    Err(error) => tracing::warn!(%error, "Trimming the dead set failed; retrying."),
                }
            }
        }
    })
}

/// Counter: jobs (and health probes) the reaper took back because their lease expired.
pub const LEASES_REAPED_METRIC: &str = "keyfleet_leases_reaped_total";

const REAP_BATCH: u32 = 200;
const TRIM_EVERY: Duration = Duration::from_secs(60);
