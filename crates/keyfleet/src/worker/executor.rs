//! Runs one claimed job against its server and turns the result into an outcome: done (after the
//! result is committed to Postgres), retry after a back-off, or dead-letter with the reason.

use std::{sync::Arc, time::Duration};

use apalis_core::{error::BoxDynError, task::data::Data};
use keyfleet_core::{Failure, FailureClass, JobPayload, ServerId, SubscriptionId};
use keyfleet_queue::{
    BreakerEvent, ClaimedJob, Finish, FinishResult, Handoff, LeaseRegistry, Queue, backoff,
};
use keyfleet_store::{
    DeleteIntent, KeyWrite, Store, TrafficKind, TrafficOutcome, WriteBack, WriteOutcome,
};
use keyfleet_vpn::VpnClient;
use tokio::time::Instant;

use crate::{
    observe::{self, Progress},
    reconcile, recovery,
    servers::{ClientError, ServerClients},
    settings::Settings,
};

/// What a job's work came to, before its outcome is recorded.
enum Step {
    /// A result to commit to Postgres; the job is done once it is.
    Write(KeyWrite),
    /// Nothing to write: done.
    Done,
    /// Postgres already holds a result with this newer fence.
    FencedBy(i64),
}

pub struct Executor {
    pub store: Store,
    pub queue: Queue,
    /// Finishes through here claim the process's next job in the same call.
    pub handoff: Handoff,
    pub writeback: WriteBack,
    pub clients: ServerClients,
    pub leases: LeaseRegistry,
    pub settings: Settings,
    /// Ticked each time a job ends: a slot frees and the claim loop claims again.
    pub progress: Progress,
}

/// The apalis task function: every job ends in an explicit queue outcome, never in an apalis error.
pub async fn execute(job: ClaimedJob, executor: Data<Arc<Executor>>) -> Result<(), BoxDynError> {
    executor.run(job).await;
    Ok(())
}

impl Executor {
    #[tracing::instrument(skip_all, fields(job_id = %job.id, server_id = %job.server, attempt = job.attempt))]
    pub async fn run(&self, job: ClaimedJob) {
        let kind = job_kind(&job);
        if !job.tried_before() {
            metrics::histogram!(observe::CLAIM_WAIT_METRIC, "kind" => kind)
                .record(observe::seconds_since(job.enqueued_at_ms));
        }
        let outcome = self.run_attempt(&job, kind).await;
        metrics::counter!(
            observe::JOB_OUTCOMES_METRIC,
            "server" => self.clients.name(job.server),
            "kind" => kind,
            "outcome" => outcome,
        )
        .increment(1);
        self.progress.tick();
    }

    /// Runs the attempt and records its outcome; returns the outcome's metric label.
    async fn run_attempt(&self, job: &ClaimedJob, kind: &'static str) -> &'static str {
        let lease = self.leases.hold(job, self.settings.lease);
        // Once the lease is lost (or cannot be confirmed in time, e.g. Redis unreachable) another
        // worker may take the job: stop this attempt, aborting its in-flight request, so the
        // server never sees more than its limit. Its writes, if any landed, are fenced.
        let finish = tokio::select! {
            biased;
            () = lease.lost() => {
                tracing::warn!("Lease lost mid-attempt: stopped it; the job belongs to its next attempt.");
                return "lost_lease";
            }
            finish = self.attempt(job) => finish,
        };
        match &finish {
            Finish::Done => tracing::debug!("Job done."),
            Finish::Retry { delay, error, .. } => {
                tracing::info!(?delay, %error, "Job will be retried.")
            }
            Finish::Dead { error, .. } => tracing::warn!(%error, "Job dead-lettered."),
            Finish::Requeue { error } => {
                tracing::warn!(%error, "Job runs again under a new fence.")
            }
            Finish::Release => {}
        }
        let recorded = self.record(job, &finish).await;
        // This job no longer counts as one that may still add to a write-back batch.
        drop(lease);
        self.writeback.recount();
        if let (Finish::Done, Some((FinishResult::Applied, _))) = (&finish, recorded) {
            metrics::histogram!(observe::JOB_LATENCY_METRIC, "kind" => kind)
                .record(observe::seconds_since(job.enqueued_at_ms));
        }
        match recorded {
            Some((FinishResult::Fenced, _)) => {
                tracing::info!("Attempt was fenced out: a newer attempt owns this job.");
            }
            Some((_, BreakerEvent::Closed)) => {
                tracing::info!("A success closed the server's circuit breaker.");
                requeue_failed_keys(&self.store, &self.queue, job.server).await;
            }
            _ => {}
        }
        outcome_label(&finish, recorded.map(|(result, _)| result))
    }

    /// Records the outcome in Redis. While Redis is unreachable it keeps trying for one lease time;
    /// after that the lease has expired anyway and the job will run again (safely: execution is
    /// idempotent and this attempt's writes are fenced): `None`.
    async fn record(
        &self,
        job: &ClaimedJob,
        finish: &Finish,
    ) -> Option<(FinishResult, BreakerEvent)> {
        let give_up = Instant::now() + self.settings.lease;
        let mut delay = Duration::from_millis(50);
        loop {
            match self.handoff.finish(job, finish).await {
                Ok(recorded) => return Some(recorded),
                Err(error) if Instant::now() + delay < give_up => {
                    tracing::warn!(%error, "Could not record the job outcome in Redis; retrying.");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(error) => {
                    tracing::error!(%error, "Gave up recording the job outcome; the job will run again.");
                    return None;
                }
            }
        }
    }

    async fn attempt(&self, job: &ClaimedJob) -> Finish {
        let payload = match JobPayload::from_json(&job.payload) {
            Ok(p) if p.server() == job.server => p,
            Ok(p) => {
                let error = format!(
                    "payload names server {} but the job is queued for {}",
                    p.server(),
                    job.server
                );
                return Finish::Dead {
                    error,
                    server_fault: false,
                };
            }
            Err(e) => {
                return Finish::Dead {
                    error: e.to_string(),
                    server_fault: false,
                };
            }
        };
        let client = match self.clients.get(payload.server()).await {
            Ok(client) => client,
            Err(ClientError::Unavailable(error)) => {
                return self
                    .failed(
                        job,
                        &payload,
                        JobError::ours(Failure::retryable(error, None)),
                    )
                    .await;
            }
            Err(ClientError::Invalid(error)) => {
                return self
                    .failed(job, &payload, JobError::ours(Failure::permanent(error)))
                    .await;
            }
        };
        let result = match &payload {
            JobPayload::CreateKey {
                server,
                subscription,
                existing,
                verify,
            } => {
                self.create(
                    job,
                    &client,
                    *server,
                    subscription,
                    existing.as_deref(),
                    *verify,
                )
                .await
            }
            JobPayload::DeleteKey {
                server,
                subscription,
                server_key_id,
            } => {
                self.delete(
                    job,
                    &client,
                    *server,
                    subscription,
                    server_key_id.as_deref(),
                )
                .await
            }
            JobPayload::SyncConfig {
                server,
                subscription,
            } => self.sync_config(job, &client, *server, subscription).await,
            JobPayload::Reconcile { server } => self.reconcile(job, &client, *server).await,
            JobPayload::CollectTraffic { server } => {
                self.collect_traffic(job, &client, *server).await
            }
        };
        match result {
            Ok(Step::Write(write)) => self.write_then_finish(job, &payload, write).await,
            Ok(Step::Done) => Finish::Done,
            Ok(Step::FencedBy(row_fence)) => self.fenced(job, &payload, row_fence).await,
            Err(e) => self.failed(job, &payload, e).await,
        }
    }

    /// A result was refused because Postgres holds a newer fence. Normally a newer attempt did the
    /// work: done. If no newer attempt exists, Redis went backwards: the fences are raised and the
    /// job runs again, spending no attempt (`recovery::fence_is_behind`).
    async fn fenced(&self, job: &ClaimedJob, payload: &JobPayload, row_fence: i64) -> Finish {
        match recovery::fence_is_behind(&self.store, &self.queue, job, row_fence).await {
            Ok(false) => {
                tracing::info!(job = %payload.kind(), row_fence, "Result not written: a newer attempt wrote it.");
                Finish::Done
            }
            Ok(true) => Finish::Requeue {
                error: format!(
                    "fenced out by fence {row_fence} though no newer attempt of this job exists (Redis went backwards); running again under a fence Postgres accepts"
                ),
            },
            Err(e) => {
                let error = JobError::ours(Failure::retryable(
                    format!("cannot tell whether the job was superseded: {e:#}"),
                    None,
                ));
                self.failed(job, payload, error).await
            }
        }
    }

    async fn create(
        &self,
        job: &ClaimedJob,
        client: &VpnClient,
        server: ServerId,
        subscription: &SubscriptionId,
        existing: Option<&str>,
        verify: bool,
    ) -> Result<Step, JobError> {
        // A create that was not enqueued by the purchase itself (reconcile, recovery, a retry) may
        // be older than the newest intent: a deprovision since makes it moot. (A purchase's own
        // first attempt is cancelled by a deprovision while queued, and its key's lock orders it
        // before any later delete.)
        if (verify || existing.is_some() || job.tried_before())
            && !self.store.key_wanted(subscription, server).await?
        {
            tracing::info!(%subscription, "Create skipped: the key is no longer wanted.");
            return Ok(Step::Done);
        }
        let adopted = match existing {
            Some(id) => match client.fetch_link(id).await {
                Ok(link) => Some((id.to_owned(), link)),
                Err(keyfleet_vpn::Error::NotFound { .. }) => None,
                Err(e) => return Err(e.into()),
            },
            None => None,
        };
        let (server_key_id, link) = match adopted {
            Some(found) => found,
            None => {
                let looked_first = verify || existing.is_some() || job.tried_before();
                let key = client.ensure_key(subscription, looked_first).await?;
                if looked_first && !key.adopted && client.can_list() {
                    // An earlier try may still have created a copy our lookup could not see yet (its
                    // request was in flight). On a server without a uniqueness check that is a second
                    // key: keep ours, the one Postgres will hold, and remove any other.
                    self.remove_other_copies(client, subscription, &key.server_key_id)
                        .await?;
                }
                (key.server_key_id, key.link)
            }
        };
        Ok(Step::Write(KeyWrite::Created {
            subscription: subscription.clone(),
            server,
            fence: job.fence,
            server_key_id,
            link,
        }))
    }

    async fn remove_other_copies(
        &self,
        client: &VpnClient,
        subscription: &SubscriptionId,
        keep: &str,
    ) -> Result<(), JobError> {
        let copies: Vec<String> = client
            .list_keys()
            .await?
            .into_iter()
            .filter(|k| k.owner.as_ref() == Some(subscription) && k.server_key_id != keep)
            .map(|k| k.server_key_id)
            .collect();
        for id in &copies {
            tracing::warn!(%subscription, server_key_id = %id, "Removing a second copy of a key left by an earlier try.");
            client.delete_key(id).await?;
        }
        Ok(())
    }

    async fn delete(
        &self,
        job: &ClaimedJob,
        client: &VpnClient,
        server: ServerId,
        subscription: &SubscriptionId,
        server_key_id: Option<&str>,
    ) -> Result<Step, JobError> {
        // Newest intent wins: under its fence (and its key's lock), the delete re-checks that
        // Postgres still wants the key gone before it touches the server.
        let known = match self
            .store
            .recheck_delete(subscription, server, job.fence, server_key_id)
            .await?
        {
            DeleteIntent::Proceed { server_key_id } => server_key_id,
            DeleteIntent::Wanted => {
                tracing::info!(%subscription, "Delete skipped: the key is wanted again.");
                return Ok(Step::Done);
            }
            DeleteIntent::Fenced { row_fence } => return Ok(Step::FencedBy(row_fence)),
        };
        let ids = match server_key_id {
            Some(id) => vec![id.to_owned()],
            None => match known {
                Some(id) => vec![id],
                // Postgres never learnt the id (e.g. the create's response was lost): derive it
                // (a gRPC node: the email), or ask the server.
                None => match client.derived_key_id(subscription) {
                    Some(id) => vec![id],
                    None => client
                        .list_keys()
                        .await?
                        .into_iter()
                        .filter(|k| k.owner.as_ref() == Some(subscription))
                        .map(|k| k.server_key_id)
                        .collect(),
                },
            },
        };
        for id in &ids {
            client.delete_key(id).await?;
        }
        Ok(Step::Write(KeyWrite::Deleted {
            subscription: subscription.clone(),
            server,
            fence: job.fence,
        }))
    }

    async fn sync_config(
        &self,
        job: &ClaimedJob,
        client: &VpnClient,
        server: ServerId,
        subscription: &SubscriptionId,
    ) -> Result<Step, JobError> {
        // Read before fetching: a bump during the fetch leaves the key stale for the next sweep.
        let generation = self.store.config_generation(server).await?;
        let Some(id) = self.store.server_key_id(subscription, server).await? else {
            return Ok(Step::Done);
        };
        match client.fetch_link(&id).await {
            Ok(link) => Ok(Step::Write(KeyWrite::ConfigSynced {
                subscription: subscription.clone(),
                server,
                fence: job.fence,
                link,
                generation,
            })),
            // Gone from the server: the reconcile sweep recreates it; nothing to sync.
            Err(keyfleet_vpn::Error::NotFound { .. }) => Ok(Step::Done),
            Err(e) => Err(e.into()),
        }
    }

    async fn reconcile(
        &self,
        job: &ClaimedJob,
        client: &VpnClient,
        server: ServerId,
    ) -> Result<Step, JobError> {
        // Postgres is read before the list and again after it. What is missing on the server is
        // judged from the first read (a create that finished after the list is not "lost"); what is
        // to be deleted from both (a purchase whose key appeared in the list after the first read
        // is wanted in the second): a key is deleted only if neither read wanted it.
        let stored = self.store.stored_keys(server).await?;
        let remote = match client {
            // A gRPC node lists its users only from Xray-core 24.11 on.
            VpnClient::XrayGrpc(node) => match node.remote_keys().await? {
                Some(remote) => remote,
                None => return self.reconcile_unlisted(node, server).await,
            },
            _ => client.list_keys().await?,
        };
        // The server answers: keys that failed here for a transient reason get another go.
        self.store.requeue_failed_keys(server).await?;
        let after = self.store.stored_keys(server).await?;
        let mut plan = reconcile::diff(&stored, &remote);
        plan.keep_only_what(&reconcile::diff(&after, &remote));
        self.write_lost(job, server, &plan).await?;
        let enqueued = self.enqueue_plan(server, &plan).await?;
        tracing::info!(
            remote = remote.len(),
            stored = stored.len(),
            create = plan.create.len(),
            lost = plan.lost.len(),
            adopt = plan.adopt.len(),
            delete = plan.delete.len(),
            foreign = plan.foreign,
            enqueued,
            "Reconciled server."
        );
        Ok(Step::Done)
    }

    /// Reconcile of a node with no list call (an Xray/V2Ray node over gRPC, which keeps API-added
    /// users in memory only). Its marker user tells whether it forgot them (a restart) since the
    /// last reconcile: if so, every wanted key is created again, as jobs through the queue (so at
    /// most the server's limit at a time; each add that meets "already exists" adopts). If the
    /// repairs cannot be queued, the marker is removed again so the next reconcile sees the
    /// restart too.
    async fn reconcile_unlisted(
        &self,
        node: &keyfleet_vpn::XrayClient,
        server: ServerId,
    ) -> Result<Step, JobError> {
        let stored = self.store.stored_keys(server).await?;
        let restarted = node.marker_was_missing().await?;
        self.store.requeue_failed_keys(server).await?;
        if !restarted {
            tracing::info!(
                stored = stored.len(),
                "Reconciled server: the node kept its users."
            );
            return Ok(Step::Done);
        }
        let after = self.store.stored_keys(server).await?;
        let mut plan = reconcile::diff(&stored, &[]);
        plan.keep_only_what(&reconcile::diff(&after, &[]));
        // Not recorded as lost: the first reconcile of a node cannot tell a restart from a node
        // that never had the marker, and each create adopts a user that is still there, so the
        // keys stay active (with their unchanged links) while they are added again.
        plan.lost.clear();
        let enqueued = match self.enqueue_plan(server, &plan).await {
            Ok(enqueued) => enqueued,
            Err(e) => {
                if let Err(undo) = node.forget_marker().await {
                    tracing::warn!(error = %undo, "Could not remove the marker user after a failed reconcile; its restart may go unnoticed until the next one.");
                }
                return Err(e);
            }
        };
        tracing::info!(
            stored = stored.len(),
            create = plan.create.len(),
            lost = plan.lost.len(),
            enqueued,
            "Reconciled server: the node had lost its users (restart); adding every wanted user again."
        );
        Ok(Step::Done)
    }

    async fn write_lost(
        &self,
        job: &ClaimedJob,
        server: ServerId,
        plan: &reconcile::Plan,
    ) -> Result<(), JobError> {
        let lost = plan.lost.iter().map(|sub| {
            self.writeback.write(KeyWrite::Lost {
                subscription: sub.clone(),
                server,
                fence: job.fence,
            })
        });
        for written in futures::future::join_all(lost).await {
            if let WriteOutcome::Fenced { row_fence } = written? {
                tracing::info!(
                    row_fence,
                    "A key reconcile found missing was written since by a newer attempt."
                );
            }
        }
        Ok(())
    }

    /// Enqueues the plan's repairs and counts its drift; returns how many jobs were new.
    async fn enqueue_plan(
        &self,
        server: ServerId,
        plan: &reconcile::Plan,
    ) -> Result<usize, JobError> {
        let jobs: Vec<JobPayload> = plan
            .create
            .iter()
            .map(|sub| JobPayload::CreateKey {
                server,
                subscription: sub.clone(),
                existing: None,
                // A key Postgres had as active and the list lacks has no create in flight: create it
                // straight away (a wiped node's thousands of keys must not each list the server).
                // A pending one may: look first.
                verify: !plan.lost.contains(sub),
            })
            .chain(plan.adopt.iter().map(|(sub, id)| JobPayload::CreateKey {
                server,
                subscription: sub.clone(),
                existing: Some(id.clone()),
                verify: true,
            }))
            .chain(plan.delete.iter().map(|(sub, id)| JobPayload::DeleteKey {
                server,
                subscription: sub.clone(),
                server_key_id: Some(id.clone()),
            }))
            .collect();
        let enqueued = enqueue_tolerating_duplicates(&self.queue, &jobs).await?;
        // Counted once the repairs are queued (a run that fails before is retried and finds it again).
        let name = self.clients.name(server);
        for (drift, keys) in [
            ("missing", plan.create.len() - plan.lost.len()),
            ("lost", plan.lost.len()),
            ("unrecorded", plan.adopt.len()),
            ("unwanted", plan.delete.len()),
        ] {
            metrics::counter!(
                observe::RECONCILE_DRIFT_METRIC,
                "server" => name.clone(),
                "drift" => drift,
            )
            .increment(keys as u64);
        }
        Ok(enqueued)
    }

    async fn collect_traffic(
        &self,
        job: &ClaimedJob,
        client: &VpnClient,
        server: ServerId,
    ) -> Result<Step, JobError> {
        let (traffic, kind) = match client {
            VpnClient::XrayGrpc(node) => {
                let (traffic, started) = node.traffic_since_start().await?;
                (traffic, TrafficKind::CumulativeSince(started))
            }
            VpnClient::V2ray(_) => (client.traffic().await?, TrafficKind::Cumulative),
            VpnClient::Outline(_) => (client.traffic().await?, TrafficKind::RollingWindow),
        };
        let readings: Vec<(String, i64)> = traffic
            .into_iter()
            .map(|t| (t.server_key_id, i64::try_from(t.bytes).unwrap_or(i64::MAX)))
            .collect();
        match self
            .store
            .record_traffic(server, kind, job.fence, &readings)
            .await?
        {
            TrafficOutcome::Applied(updated) => {
                tracing::info!(readings = readings.len(), updated, "Traffic collected.");
                Ok(Step::Done)
            }
            TrafficOutcome::Fenced { row_fence } => Ok(Step::FencedBy(row_fence)),
        }
    }

    async fn write_then_finish(
        &self,
        job: &ClaimedJob,
        payload: &JobPayload,
        write: KeyWrite,
    ) -> Finish {
        match self.writeback.write(write).await {
            Ok(WriteOutcome::Applied) => Finish::Done,
            Ok(WriteOutcome::Fenced { row_fence }) => self.fenced(job, payload, row_fence).await,
            Ok(WriteOutcome::StateMoved { state }) => {
                tracing::info!(job = %payload.kind(), %state, "Result not written: the key's intent moved on (newest intent wins).");
                Finish::Done
            }
            Ok(WriteOutcome::Missing) => {
                tracing::info!(job = %payload.kind(), "Result not written: the key row is gone.");
                Finish::Done
            }
            Err(e) => self.failed(job, payload, JobError::from(e)).await,
        }
    }

    /// Retry while attempts remain and the error can pass; otherwise record the failure on the key
    /// and dead-letter the job with the reason.
    async fn failed(&self, job: &ClaimedJob, payload: &JobPayload, error: JobError) -> Finish {
        let JobError {
            failure,
            server_fault,
        } = error;
        let server_fault = server_fault && failure.is_retryable();
        if let FailureClass::Retryable { retry_after } = failure.class
            && job.attempt < job.max_attempts
        {
            let delay = backoff(
                job.attempt,
                self.settings.retry_base,
                self.settings.retry_cap,
                retry_after,
            );
            return Finish::Retry {
                delay,
                error: failure.message,
                server_fault,
            };
        }
        let transient = failure.is_retryable();
        let error = if transient {
            format!(
                "gave up after {} attempts: {}",
                job.attempt, failure.message
            )
        } else {
            failure.message
        };
        if let JobPayload::CreateKey {
            server,
            subscription,
            ..
        } = payload
        {
            let write = KeyWrite::Failed {
                subscription: subscription.clone(),
                server: *server,
                fence: job.fence,
                error: error.clone(),
                transient,
            };
            if let Err(e) = self.writeback.write(write).await {
                tracing::warn!(error = %e, "Could not record the failure on the key row.");
            }
        }
        Finish::Dead {
            error,
            server_fault,
        }
    }
}

/// The `kind` label of a job's metrics (`unknown` for a payload that does not decode).
pub(crate) fn job_kind(job: &ClaimedJob) -> &'static str {
    JobPayload::from_json(&job.payload).map_or("unknown", |p| p.kind().as_str())
}

/// The `outcome` label of [`observe::JOB_OUTCOMES_METRIC`]: what the queue made of the attempt.
/// - `done`: acknowledged after its result (if any) committed in Postgres;
/// - `retry`: back to the delayed set, with a back-off;
/// - `dead`: dead-lettered (a permanent error, or the attempts are spent);
/// - `requeued`: run again at once under a new fence (Redis went backwards), no attempt spent;
/// - `released`: given back unstarted at shutdown (counted by the worker's claim hooks);
/// - `fenced`: the finish changed nothing, a newer attempt owns the job;
/// - `lost_lease`: stopped mid-attempt because its lease was lost or could not be confirmed;
/// - `unrecorded`: Redis could not be told within a lease time; the job will run again.
pub(crate) fn outcome_label(finish: &Finish, recorded: Option<FinishResult>) -> &'static str {
    match (recorded, finish) {
        (None, _) => "unrecorded",
        (Some(FinishResult::Fenced), _) => "fenced",
        (Some(FinishResult::DeadLettered), _) => "dead",
        (Some(FinishResult::Applied), Finish::Done) => "done",
        (Some(FinishResult::Applied), Finish::Retry { .. }) => "retry",
        (Some(FinishResult::Applied), Finish::Dead { .. }) => "dead",
        (Some(FinishResult::Applied), Finish::Release) => "released",
        (Some(FinishResult::Applied), Finish::Requeue { .. }) => "requeued",
    }
}

/// A failed step of a job, and whether the server is to blame (for its circuit breaker).
struct JobError {
    failure: Failure,
    server_fault: bool,
}

impl JobError {
    fn ours(failure: Failure) -> Self {
        Self {
            failure,
            server_fault: false,
        }
    }
}

impl From<keyfleet_vpn::Error> for JobError {
    fn from(e: keyfleet_vpn::Error) -> Self {
        Self {
            failure: e.to_failure(),
            server_fault: true,
        }
    }
}

impl From<keyfleet_store::Error> for JobError {
    fn from(e: keyfleet_store::Error) -> Self {
        let message = format!("Postgres: {e}");
        let failure = if e.is_transient() {
            Failure::retryable(message, None)
        } else {
            Failure::permanent(message)
        };
        Self::ours(failure)
    }
}

impl From<keyfleet_queue::Error> for JobError {
    fn from(e: keyfleet_queue::Error) -> Self {
        Self::ours(Failure::retryable(format!("Redis: {e}"), None))
    }
}

/// Puts the server's keys that failed for a transient reason back to pending and enqueues their
/// creates (the server answers again: its breaker closed, or reconcile listed it).
pub async fn requeue_failed_keys(store: &Store, queue: &Queue, server: ServerId) {
    let requeued = match store.requeue_failed_keys(server).await {
        Ok(subs) => subs,
        Err(error) => {
            tracing::warn!(%error, server_id = %server, "Could not requeue transiently failed keys; reconcile will.");
            return;
        }
    };
    if requeued.is_empty() {
        return;
    }
    let jobs: Vec<JobPayload> = requeued
        .into_iter()
        .map(|subscription| JobPayload::CreateKey {
            server,
            subscription,
            existing: None,
            verify: true,
        })
        .collect();
    match enqueue_tolerating_duplicates(queue, &jobs).await {
        Ok(enqueued) => {
            tracing::info!(server_id = %server, keys = jobs.len(), enqueued, "Retrying keys that failed while the server was down.")
        }
        Err(error) => {
            tracing::warn!(%error, server_id = %server, "Could not enqueue retries of failed keys; reconcile will.")
        }
    }
}

/// Enqueues jobs; an operation already queued under another payload counts as queued.
pub async fn enqueue_tolerating_duplicates(
    queue: &Queue,
    jobs: &[JobPayload],
) -> Result<usize, keyfleet_queue::Error> {
    let results = futures::future::join_all(jobs.iter().map(|j| queue.enqueue(j))).await;
    let mut created = 0;
    for result in results {
        match result {
            Ok(e) if e.created => created += 1,
            Ok(_) | Err(keyfleet_queue::Error::IdempotencyConflict { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(created)
}
