//! Runs one claimed job against its server and turns the result into an outcome: done (after the
//! result is committed to Postgres), retry after a back-off, or dead-letter with the reason.

use std::sync::Arc;

use apalis_core::{error::BoxDynError, task::data::Data};
use keyfleet_core::{Failure, FailureClass, JobKind, JobPayload};
use keyfleet_queue::{ClaimedJob, Finish, FinishResult, LeaseRegistry, Queue, backoff};
use keyfleet_store::{KeyWrite, WriteBack};

use crate::{
    servers::{ClientError, ServerClients},
    settings::Settings,
};

pub struct Executor {
    pub queue: Queue,
    pub writeback: WriteBack,
    pub clients: ServerClients,
    pub leases: LeaseRegistry,
    pub settings: Settings,
}

/// The apalis task function: every job ends in an explicit queue outcome, never in an apalis error.
pub async fn execute(job: ClaimedJob, executor: Data<Arc<Executor>>) -> Result<(), BoxDynError> {
    executor.run(job).await;
    Ok(())
}

impl Executor {
    #[tracing::instrument(skip_all, fields(job_id = %job.id, server_id = %job.server, attempt = job.attempt))]
    pub async fn run(&self, job: ClaimedJob) {
        let _lease = self.leases.hold(&job);
        let finish = self.attempt(&job).await;
        match &finish {
            Finish::Done => tracing::debug!("Job done."),
            Finish::Retry { delay, error } => {
                tracing::info!(?delay, %error, "Job will be retried.")
            }
            Finish::Dead { error } => tracing::warn!(%error, "Job dead-lettered."),
            Finish::Release => {}
        }
        // A Redis hiccup here must not lose the outcome; if it persists, the lease expires and the
        // job runs again, which is safe because execution is idempotent.
        for attempt in 1..=5u32 {
            match self.queue.finish(&job, &finish).await {
                Ok(FinishResult::Fenced) => {
                    tracing::info!("Attempt was fenced out: a newer attempt owns this job.");
                    return;
                }
                Ok(_) => return,
                Err(error) => {
                    tracing::warn!(%error, "Could not record the job outcome in Redis; retrying.");
                    tokio::time::sleep(std::time::Duration::from_millis(100 * u64::from(attempt)))
                        .await;
                }
            }
        }
    }

    async fn attempt(&self, job: &ClaimedJob) -> Finish {
        let payload = match JobPayload::from_json(&job.payload) {
            Ok(p) if p.server == job.server => p,
            Ok(p) => {
                return Finish::Dead {
                    error: format!(
                        "payload names server {} but the job is queued for {}",
                        p.server, job.server
                    ),
                };
            }
            Err(e) => {
                return Finish::Dead {
                    error: e.to_string(),
                };
            }
        };
        let client = match self.clients.get(payload.server).await {
            Ok(client) => client,
            Err(ClientError::Unavailable(error)) => {
                return self
                    .failed(job, &payload, Failure::retryable(error, None))
                    .await;
            }
            Err(ClientError::Invalid(error)) => {
                return self.failed(job, &payload, Failure::permanent(error)).await;
            }
        };
        match payload.kind {
            JobKind::CreateKey => match client
                .ensure_key(&payload.subscription, job.attempt > 1)
                .await
            {
                Ok(key) => {
                    let write = KeyWrite::Created {
                        subscription: payload.subscription.clone(),
                        server: payload.server,
                        fence: job.fence,
                        server_key_id: key.server_key_id,
                        link: key.link,
                    };
                    self.write_then_finish(job, &payload, write).await
                }
                Err(e) => self.failed(job, &payload, e.to_failure()).await,
            },
            JobKind::DeleteKey | JobKind::SyncConfig => {
                let error = format!("this worker does not execute {} jobs yet", payload.kind);
                self.failed(job, &payload, Failure::permanent(error)).await
            }
        }
    }

    async fn write_then_finish(
        &self,
        job: &ClaimedJob,
        payload: &JobPayload,
        write: KeyWrite,
    ) -> Finish {
        match self.writeback.write(write).await {
            Ok(true) => Finish::Done,
            Ok(false) => {
                tracing::info!(subscription = %payload.subscription, "Result not written: a newer attempt already wrote this key.");
                Finish::Done
            }
            Err(e) => {
                self.failed(
                    job,
                    payload,
                    Failure::retryable(format!("write-back failed: {e}"), None),
                )
                .await
            }
        }
    }

    /// Retry while attempts remain and the error can pass; otherwise record the failure on the key
    /// and dead-letter the job with the reason.
    async fn failed(&self, job: &ClaimedJob, payload: &JobPayload, failure: Failure) -> Finish {
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
            };
        }
        let error = if failure.is_retryable() {
            format!(
                "gave up after {} attempts: {}",
                job.attempt, failure.message
            )
        } else {
            failure.message
        };
        if payload.kind == JobKind::CreateKey {
            let write = KeyWrite::Failed {
                subscription: payload.subscription.clone(),
                server: payload.server,
                fence: job.fence,
                error: error.clone(),
            };
            if let Err(e) = self.writeback.write(write).await {
                tracing::warn!(error = %e, "Could not record the failure on the key row.");
            }
        }
        Finish::Dead { error }
    }
}
