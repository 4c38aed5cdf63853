//! The periodic sweeps, run by the scheduler or by hand (`keyfleet sweep …`). A sweep only
//! enqueues: the work happens in per-server jobs under the fleet-wide limits, and an operation
//! already queued is not queued twice (so a sweep that overlaps its previous run adds nothing).

use std::{collections::BTreeMap, time::Duration};

use keyfleet_core::{JobPayload, ServerId};
use keyfleet_queue::Queue;
use keyfleet_store::Store;
use serde::Serialize;

use crate::worker::enqueue_tolerating_duplicates;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sweep {
    /// List each server once and repair the differences with Postgres.
    Reconcile,
    /// Delete the keys of subscriptions past their expiry.
    Expire,
    /// Re-fetch links that are missing, older than the TTL, or predate a config bump.
    Configs,
    /// Collect traffic counters, one request per server.
    Traffic,
}

impl Sweep {
    pub const ALL: [Self; 4] = [Self::Reconcile, Self::Expire, Self::Configs, Self::Traffic];

    pub fn name(self) -> &'static str {
        match self {
            Self::Reconcile => "reconcile",
            Self::Expire => "expire",
            Self::Configs => "configs",
            Self::Traffic => "traffic",
        }
    }
}

/// What a sweep enqueued, per server.
#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    pub sweep: Sweep,
    /// Server name → jobs found to do.
    pub jobs: BTreeMap<String, usize>,
    /// Of those, how many were new (the rest were already queued).
    pub enqueued: usize,
    /// Not-yet-started create/config jobs cancelled because their key is being deleted.
    pub cancelled: u64,
}

pub async fn run(
    store: &Store,
    queue: &Queue,
    sweep: Sweep,
    server: Option<&str>,
    config_ttl: Duration,
) -> anyhow::Result<SweepReport> {
    let servers = store.list_servers().await?;
    let only: Option<ServerId> = match server {
        Some(name) => Some(store.server_by_name(name).await?.id),
        None => None,
    };
    let active: Vec<ServerId> = servers
        .iter()
        .filter(|s| s.active && only.is_none_or(|id| id == s.id))
        .map(|s| s.id)
        .collect();
    let mut cancelled = 0;
    let jobs: Vec<JobPayload> = match sweep {
        Sweep::Reconcile => active
            .iter()
            .map(|&server| JobPayload::Reconcile { server })
            .collect(),
        Sweep::Traffic => active
            .iter()
            .map(|&server| JobPayload::CollectTraffic { server })
            .collect(),
        Sweep::Configs => store
            .stale_configs(config_ttl, only)
            .await?
            .into_iter()
            .map(|(server, subscription)| JobPayload::SyncConfig {
                server,
                subscription,
            })
            .collect(),
        Sweep::Expire => {
            let doomed = store.expire_due(only).await?;
            let superseded: Vec<JobPayload> = doomed
                .iter()
                .flat_map(|(server, sub)| {
                    [
                        JobPayload::create(*server, sub.clone()),
                        JobPayload::SyncConfig {
                            server: *server,
                            subscription: sub.clone(),
                        },
                    ]
                })
                .collect();
            cancelled = queue.cancel(&superseded).await?;
            doomed
                .into_iter()
                .map(|(server, sub)| JobPayload::delete(server, sub))
                .collect()
        }
    };
    let enqueued = enqueue_tolerating_duplicates(queue, &jobs).await?;
    let mut per_server = BTreeMap::new();
    for job in &jobs {
        let name = servers
            .iter()
            .find(|s| s.id == job.server())
            .map_or_else(|| job.server().to_string(), |s| s.name.clone());
        *per_server.entry(name).or_insert(0) += 1;
    }
    Ok(SweepReport {
        sweep,
        jobs: per_server,
        enqueued,
        cancelled,
    })
}
