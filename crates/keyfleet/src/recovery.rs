//! Redis-loss recovery. Redis only carries work: when it comes back empty (a restart without
//! persistence, a flush, a new instance) or is found behind Postgres (restored from an old
//! snapshot), the work it carried is re-derived from Postgres, which holds every intent.
//!
//! Detection is by the fence epoch: a Redis without `P:epoch` lost keyfleet's state (or is new).
//! Nothing is claimed from it until a worker took a new epoch from Postgres and raised the fence
//! counter past every fence of earlier epochs and enqueued every outstanding operation. A Redis restored from a snapshot keeps its epoch but hands out
//! fences older than some Postgres holds: the first write fenced out by a fence Redis never issued
//! reveals it (`fence_is_behind`), and the fences are raised past a new epoch.

use keyfleet_core::JobPayload;
use keyfleet_queue::{ClaimedJob, FENCE_EPOCH_SHIFT, Queue};
use keyfleet_store::Store;
use serde::Serialize;

use crate::{settings::Settings, worker::enqueue_tolerating_duplicates};

/// What a recovery enqueued.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RecoveryReport {
    /// The fence epoch Redis now hands out fences from.
    pub epoch: i64,
    pub creates: usize,
    pub deletes: usize,
    pub config_syncs: usize,
    /// Of all those, how many were not already queued.
    pub enqueued: usize,
}

/// Initialises a Redis that holds no fence epoch: raises its fences past a new epoch, re-derives
/// every outstanding operation from Postgres, and only then marks it initialised, so no job is
/// claimed (and no idempotency key released) before the lost work is back. Several processes may do
/// this at once; their enqueues are the same operations and dedupe. Returns the report of the one
/// whose mark took effect.
pub async fn initialize(
    store: &Store,
    queue: &Queue,
    settings: &Settings,
) -> anyhow::Result<Option<RecoveryReport>> {
    let epoch = store.next_fence_epoch().await?;
    queue.raise_fence(epoch << FENCE_EPOCH_SHIFT).await?;
    let report = recover(store, queue, settings, epoch).await?;
    if !queue.mark_initialized(epoch).await? {
        return Ok(None);
    }
    if epoch == 1 {
        tracing::info!(?report, "Initialised a new Redis from Postgres.");
    } else {
        tracing::warn!(
            ?report,
            "Redis held no keyfleet state (it lost its data, or is new): re-derived outstanding work from Postgres."
        );
    }
    Ok(Some(report))
}

/// `keyfleet recover`: starts a new fence epoch whatever Redis holds, then re-derives every
/// outstanding operation from Postgres. Safe at any time: work already queued is not queued again.
pub async fn force(
    store: &Store,
    queue: &Queue,
    settings: &Settings,
) -> anyhow::Result<RecoveryReport> {
    let epoch = store.next_fence_epoch().await?;
    queue.raise_fence(epoch << FENCE_EPOCH_SHIFT).await?;
    let report = recover(store, queue, settings, epoch).await?;
    queue.mark_initialized(epoch).await?;
    tracing::info!(?report, "Re-derived outstanding work from Postgres.");
    Ok(report)
}

/// Whether `job`'s result, refused because Postgres holds `row_fence`, was refused wrongly: no
/// newer attempt exists, Redis went backwards (restored from an old snapshot, or a failover lost
/// writes) and handed out a fence older than one Postgres already stored. True when Postgres holds
/// a fence Redis never handed out, or when the job is still this attempt's (a newer attempt of
/// the job would have taken its lease, and a key's other jobs never run beside it: they hold the
/// key's lock). Then the fences are raised past `row_fence` under a new epoch, so the job can run
/// again under a fence Postgres accepts.
pub async fn fence_is_behind(
    store: &Store,
    queue: &Queue,
    job: &ClaimedJob,
    row_fence: i64,
) -> anyhow::Result<bool> {
    let current = queue.current_fence().await?;
    if row_fence <= current && !queue.is_current_attempt(job).await? {
        return Ok(false);
    }
    if row_fence >= current {
        let epoch = store.next_fence_epoch().await?;
        queue
            .raise_fence((epoch << FENCE_EPOCH_SHIFT).max(row_fence + 1))
            .await?;
        tracing::warn!(
            row_fence,
            epoch,
            "Postgres holds a fence Redis never handed out (Redis went backwards): fences raised to a new epoch."
        );
    }
    Ok(true)
}

async fn recover(
    store: &Store,
    queue: &Queue,
    settings: &Settings,
    epoch: i64,
) -> anyhow::Result<RecoveryReport> {
    let servers = store.list_servers().await?;
    crate::servers::apply_to_queue(queue, &servers).await?;
    let mut jobs = Vec::new();
    for server in servers.iter().filter(|s| s.active) {
        store.requeue_failed_keys(server.id).await?;
    }
    let creates = store.outstanding_creates().await?;
    jobs.extend(
        creates
            .iter()
            .map(|(server, subscription, tried)| JobPayload::CreateKey {
                server: *server,
                subscription: subscription.clone(),
                existing: None,
                verify: *tried,
            }),
    );
    let deletes = store.expire_due(None).await?;
    jobs.extend(
        deletes
            .iter()
            .map(|(server, sub)| JobPayload::delete(*server, sub.clone())),
    );
    let configs = store.stale_configs(settings.config_ttl, None).await?;
    jobs.extend(
        configs
            .iter()
            .map(|(server, subscription)| JobPayload::SyncConfig {
                server: *server,
                subscription: subscription.clone(),
            }),
    );
    let enqueued = enqueue_tolerating_duplicates(queue, &jobs).await?;
    let report = RecoveryReport {
        epoch,
        creates: creates.len(),
        deletes: deletes.len(),
        config_syncs: configs.len(),
        enqueued,
    };
    Ok(report)
}
