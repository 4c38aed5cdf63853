//! Runs one claimed job against its server and turns the result into an outcome: done (after the
//! result is committed to Postgres), retry after a back-off, or dead-letter with the reason.

use std::{sync::Arc, time::Duration};

use apalis_core::{error::BoxDynError, task::data::Data};
use keyfleet_core::{Failure, FailureClass, JobKind, JobPayload};
use keyfleet_queue::{ClaimedJob, Finish, FinishResult, LeaseRegistry, Queue, backoff};
use keyfleet_store::{KeyWrite, WriteBack};
use tokio::time::Instant;

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

/// Who failed: the VPN server (counts towards its circuit breaker) or keyfleet's own side.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Blame {
    Server,
    Ours,
}

impl Executor {
    #[tracing::instrument(skip_all, fields(job_id = %job.id, server_id = %job.server, attempt = job.attempt))]
    pub async fn run(&self, job: ClaimedJob) {
        let _lease = self.leases.hold(&job);
        let finish = self.attempt(&job).await;
        match &finish {
            Finish::Done => tracing::debug!("Job done."),
            Finish::Retry { delay, error, .. } => {
                tracing::info!(?delay, %error, "Job will be retried.")
            }
            Finish::Dead { error, .. } => tracing::warn!(%error, "Job dead-lettered."),
            Finish::Release => {}
        }
        self.record(&job, &finish).await;
    }

    /// Records the outcome in Redis. While Redis is unreachable it keeps trying for one lease time;
    /// after that the lease has expired anyway and the job will run again (safely: execution is
    /// idempotent and this attempt's writes are fenced).
    async fn record(&self, job: &ClaimedJob, finish: &Finish) {
        let give_up = Instant::now() + self.settings.lease;
        let mut delay = Duration::from_millis(50);
        loop {
            match self.queue.finish(job, finish).await {
                Ok(FinishResult::Fenced) => {
                    tracing::info!("Attempt was fenced out: a newer attempt owns this job.");
                    return;
                }
                Ok(_) => return,
                Err(error) if Instant::now() + delay < give_up => {
                    tracing::warn!(%error, "Could not record the job outcome in Redis; retrying.");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(error) => {
                    tracing::error!(%error, "Gave up recording the job outcome; the job will run again.");
                    return;
                }
            }
        }
    }

    async fn attempt(&self, job: &ClaimedJob) -> Finish {
        let payload = match JobPayload::from_json(&job.payload) {
            Ok(p) if p.server == job.server => p,
            Ok(p) => {
                let error = format!(
                    "payload names server {} but the job is queued for {}",
                    p.server, job.server
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
        let client = match self.clients.get(payload.server).await {
            Ok(client) => client,
            Err(ClientError::Unavailable(error)) => {
                return self
                    .failed(job, &payload, Failure::retryable(error, None), Blame::Ours)
                    .await;
            }
            Err(ClientError::Invalid(error)) => {
                return self
                    .failed(job, &payload, Failure::permanent(error), Blame::Ours)
                    .await;
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
                Err(e) => {
                    self.failed(job, &payload, e.to_failure(), Blame::Server)
                        .await
                }
            },
            JobKind::DeleteKey | JobKind::SyncConfig => {
                let error = format!("this worker does not execute {} jobs yet", payload.kind);
                self.failed(job, &payload, Failure::permanent(error), Blame::Ours)
                    .await
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
                let failure = Failure::retryable(format!("write-back failed: {e}"), None);
                self.failed(job, payload, failure, Blame::Ours).await
            }
        }
    }

    /// Retry while attempts remain and the error can pass; otherwise record the failure on the key
    /// and dead-letter the job with the reason.
    async fn failed(
        &self,
        job: &ClaimedJob,
        payload: &JobPayload,
        failure: Failure,
        blame: Blame,
    ) -> Finish {
        let server_fault = blame == Blame::Server && failure.is_retryable();
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
        Finish::Dead {
            error,
            server_fault,
        }
    }
}
