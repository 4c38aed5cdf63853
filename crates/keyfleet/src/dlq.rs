//! The dead-letter set as operators see it: list with reasons, replay or purge by id, server, age
//! or all.

use keyfleet_core::JobPayload;
use keyfleet_queue::{DeadJob, JobId, Queue, ReplayOutcome};
use keyfleet_store::Store;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    #[serde(flatten)]
    pub job: DeadJob,
    pub server_name: Option<String>,
}

pub async fn list(store: &Store, queue: &Queue, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
    let servers = store.list_servers().await?;
    Ok(queue
        .dead_jobs(limit)
        .await?
        .into_iter()
        .map(|job| {
            let server_name = servers
                .iter()
                .find(|s| s.id == job.server)
                .map(|s| s.name.clone());
            DeadLetter { job, server_name }
        })
        .collect())
}

#[derive(Debug, Clone)]
pub enum Selection {
    Ids(Vec<JobId>),
    Server(String),
    /// Dead for longer than this.
    OlderThan(std::time::Duration),
    All,
}

const EVERYTHING: usize = 1_000_000;

/// The ids of the selected dead jobs, and the dead set as read.
async fn select(
    store: &Store,
    queue: &Queue,
    selection: Selection,
) -> anyhow::Result<(Vec<JobId>, Vec<DeadJob>)> {
    let dead: Vec<DeadJob> = queue.dead_jobs(EVERYTHING).await?;
    let ids: Vec<JobId> = match selection {
        Selection::Ids(ids) => ids,
        Selection::Server(name) => {
            let server = store.server_by_name(&name).await?;
            dead.iter()
                .filter(|j| j.server == server.id)
                .map(|j| j.id)
                .collect()
        }
        Selection::OlderThan(age) => {
            let cutoff = chrono::Utc::now().timestamp_millis() - age.as_millis() as i64;
            dead.iter()
                .filter(|j| j.dead_at_ms < cutoff)
                .map(|j| j.id)
                .collect()
        }
        Selection::All => dead.iter().map(|j| j.id).collect(),
    };
    Ok((ids, dead))
}

/// Deletes the selected dead jobs for good; returns those that were dead. Their keys keep the
/// failure recorded in Postgres.
pub async fn purge(
    store: &Store,
    queue: &Queue,
    selection: Selection,
) -> anyhow::Result<Vec<JobId>> {
    let (ids, _) = select(store, queue, selection).await?;
    Ok(queue.discard(&ids).await?)
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    pub replayed: Vec<JobId>,
    pub superseded: Vec<JobId>,
    pub not_dead: Vec<JobId>,
}

/// Replays the selected dead jobs; keys of replayed creates go back to `pending` in Postgres.
pub async fn replay(
    store: &Store,
    queue: &Queue,
    selection: Selection,
) -> anyhow::Result<ReplayReport> {
    let (ids, dead) = select(store, queue, selection).await?;
    let mut report = ReplayReport::default();
    let mut pending_again = Vec::new();
    for (id, outcome) in queue.replay(&ids).await? {
        match outcome {
            ReplayOutcome::Replayed => {
                report.replayed.push(id);
                if let Some(job) = dead.iter().find(|j| j.id == id)
                    && let Ok(payload) = JobPayload::from_json(&job.payload)
                    && let JobPayload::CreateKey {
                        server,
                        subscription,
                        ..
                    } = payload
                {
                    pending_again.push((subscription, server));
                }
            }
            ReplayOutcome::Superseded => report.superseded.push(id),
            ReplayOutcome::NotDead => report.not_dead.push(id),
        }
    }
    store.mark_failed_keys_pending(&pending_again).await?;
    Ok(report)
}
