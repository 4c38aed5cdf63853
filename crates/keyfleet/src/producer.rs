//! The producer: what the purchase service calls. It records the desired state in Postgres first
//! (so a reconcile can always re-derive the work), then enqueues one job per server, in the urgent
//! lane: a customer waits for these, not for sweeps.

use chrono::{DateTime, Utc};
use keyfleet_core::{JobPayload, ServerId, SubscriptionId};
use keyfleet_queue::{JobId, Lane, Queue};
use keyfleet_store::{Server, Store};
use serde::Serialize;

#[derive(Clone)]
pub struct Producer {
    store: Store,
    queue: Queue,
}

/// What `provision` accepted.
#[derive(Debug, Clone, Serialize)]
pub struct ProvisionReceipt {
    pub subscription: SubscriptionId,
    pub jobs: Vec<EnqueuedJob>,
    /// Servers where the key already exists (a renewal): nothing to do there.
    pub already_active: Vec<ServerId>,
}

/// What `deprovision` accepted.
#[derive(Debug, Clone, Serialize)]
pub struct DeprovisionReceipt {
    pub subscription: SubscriptionId,
    /// One delete job per server that had a key.
    pub jobs: Vec<EnqueuedJob>,
    /// Not-yet-started create/config jobs of those keys, cancelled.
    pub cancelled: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EnqueuedJob {
    pub server: ServerId,
    pub job: JobId,
    /// False when the same create was already queued (idempotency): `job` is that one.
    pub new: bool,
}

impl Producer {
    pub fn new(store: Store, queue: Queue) -> Self {
        Self { store, queue }
    }

    /// Creates or renews a subscription: one create job per active server whose key is not live.
    pub async fn provision(
        &self,
        subscription: &SubscriptionId,
        expires_at: Option<DateTime<Utc>>,
    ) -> anyhow::Result<ProvisionReceipt> {
        if let Some(at) = expires_at
            && at <= Utc::now()
        {
            anyhow::bail!("--expires-at {} is in the past", at.to_rfc3339());
        }
        self.provision_by(subscription, expires_at, None).await
    }

    /// [`Producer::provision`] on behalf of a producer (an API token's name): a subscription
    /// another producer owns is refused with nothing written (see `Store::record_provision_by`).
    pub async fn provision_by(
        &self,
        subscription: &SubscriptionId,
        expires_at: Option<DateTime<Utc>>,
        producer: Option<&str>,
    ) -> anyhow::Result<ProvisionReceipt> {
        let plan = self
            .store
            .record_provision_by(subscription, expires_at, producer)
            .await?;
        let payloads: Vec<JobPayload> = plan
            .to_create
            .iter()
            .map(|&(server, tried)| JobPayload::CreateKey {
                server,
                subscription: subscription.clone(),
                existing: None,
                verify: tried,
            })
            .collect();
        let results = self.queue.enqueue_each_in(Lane::Urgent, &payloads).await?;
        let mut jobs = Vec::with_capacity(payloads.len());
        for (payload, result) in payloads.iter().zip(results) {
            let (job, new) = match result {
                Ok(e) => (e.id, e.created),
                // The same create is already queued (with another `verify`): that job does it.
                Err(keyfleet_queue::Error::IdempotencyConflict { job, .. }) => (job, false),
                Err(e) => return Err(e.into()),
            };
            jobs.push(EnqueuedJob {
                server: payload.server(),
                job,
                new,
            });
        }
        Ok(ProvisionReceipt {
            subscription: subscription.clone(),
            jobs,
            already_active: plan.already_active,
        })
    }

    /// Cancels a subscription: its keys are marked for deletion, their not-yet-started create and
    /// config jobs are cancelled, and one delete job per server is enqueued.
    pub async fn deprovision(
        &self,
        subscription: &SubscriptionId,
    ) -> anyhow::Result<DeprovisionReceipt> {
        let servers = self.store.record_deprovision(subscription).await?;
        let superseded: Vec<JobPayload> = servers
            .iter()
            .flat_map(|&server| {
                [
                    JobPayload::create(server, subscription.clone()),
                    JobPayload::SyncConfig {
                        server,
                        subscription: subscription.clone(),
                    },
                ]
            })
            .collect();
        let cancelled = self.queue.cancel(&superseded).await?;
        let payloads: Vec<JobPayload> = servers
            .iter()
            .map(|&s| JobPayload::delete(s, subscription.clone()))
            .collect();
        let enqueued = self.queue.enqueue_all_in(Lane::Urgent, &payloads).await?;
        Ok(DeprovisionReceipt {
            subscription: subscription.clone(),
            jobs: payloads
                .iter()
                .zip(enqueued)
                .map(|(p, e)| EnqueuedJob {
                    server: p.server(),
                    job: e.id,
                    new: e.created,
                })
                .collect(),
            cancelled,
        })
    }
}

/// Pushes these servers' `max_in_flight` to the queue.
pub async fn sync_limits(queue: &Queue, servers: &[Server]) -> anyhow::Result<()> {
    let limits: Vec<(ServerId, u32)> = servers
        .iter()
        .map(|s| (s.id, s.max_in_flight.max(1) as u32))
        .collect();
    queue.set_limits(&limits).await?;
    Ok(())
}
