use std::{collections::HashMap, sync::Arc};

use parking_lot::Mutex;
use tokio::task::JoinHandle;

use crate::{BuriedJob, ClaimedJob, JobId, Queue};

/// The jobs this process holds leases on, so one heartbeat call can extend them all.
#[derive(Clone, Default)]
pub struct LeaseRegistry {
    held: Arc<Mutex<HashMap<JobId, i64>>>,
}

/// Removes its job from the registry when dropped (the job finished, failed or panicked).
pub struct LeaseGuard {
    registry: LeaseRegistry,
    id: JobId,
}

impl LeaseRegistry {
    pub fn hold(&self, job: &ClaimedJob) -> LeaseGuard {
        self.held.lock().insert(job.id, job.fence);
        LeaseGuard {
            registry: self.clone(),
            id: job.id,
        }
    }

    pub fn len(&self) -> usize {
        self.held.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn snapshot(&self) -> Vec<(JobId, i64)> {
        self.held
            .lock()
            .iter()
            .map(|(id, fence)| (*id, *fence))
            .collect()
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.registry.held.lock().remove(&self.id);
    }
}

/// Heartbeats this process's leases and takes back expired leases of dead workers, every third of
/// the lease time. Redis errors are logged and retried; the task never ends on its own.
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
    let period = queue.config().lease / 3;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match queue.heartbeat(&registry.snapshot()).await {
                Ok(lost) if !lost.is_empty() => {
                    tracing::warn!(jobs = ?lost, "Lost leases; those attempts will be fenced out.");
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "Heartbeat failed; retrying."),
            }
            loop {
                match queue.reap_expired(REAP_BATCH).await {
                    Ok((n, buried)) if n > 0 => {
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
        }
    })
}

const REAP_BATCH: u32 = 200;
