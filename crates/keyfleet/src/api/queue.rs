//! The queue per server, the dead-letter set (list, replay, discard) and sweeps on demand.

use std::collections::HashMap;

use axum::{
    Json,
    extract::{Path, State},
};
use keyfleet_core::ServerId;
use keyfleet_queue::{Breaker, DeadJob, JobId};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{
    AppState,
    auth::Caller,
    error::{ApiError, ApiResult, Body, BodyRejected, ErrorBody, Guarded, Params},
};
use crate::{
    dlq::{self, Selection},
    sweeps::{self, Sweep},
};

#[derive(Debug, Serialize, ToSchema)]
pub struct QueueView {
    pub servers: Vec<ServerQueueView>,
    pub totals: QueueTotals,
}

#[derive(Debug, Default, Serialize, ToSchema)]
pub struct QueueTotals {
    pub ready: u64,
    pub delayed: u64,
    pub running: u64,
    pub dead: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ServerQueueView {
    pub server_id: i64,
    /// The server's name (absent if it was deleted from Postgres while jobs remain).
    pub server: Option<String>,
    pub ready: u64,
    pub delayed: u64,
    pub running: u64,
    pub dead: u64,
    pub limit: Option<u32>,
    /// closed, open (jobs wait, a health probe is due) or probing.
    pub breaker: String,
    /// Paused by an operator.
    pub paused: bool,
}

/// Per server: ready, delayed, running and dead jobs, the in-flight limit and the breaker.
#[utoipa::path(get, path = "/v1/queue", tag = "queue",
    responses(
        (status = 200, body = QueueView),
        Guarded,
    ),
    security(("bearer" = [])))]
pub async fn queue(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<QueueView>> {
    caller.operator()?;
    let names: HashMap<i64, String> = state
        .store
        .list_servers()
        .await?
        .into_iter()
        .map(|s| (s.id.0, s.name))
        .collect();
    let mut totals = QueueTotals::default();
    let servers = state
        .queue
        .server_stats()
        .await?
        .into_iter()
        .map(|s| {
            totals.ready += s.ready;
            totals.delayed += s.delayed;
            totals.running += s.running;
            totals.dead += s.dead;
            ServerQueueView {
                server_id: s.server.0,
                server: names.get(&s.server.0).cloned(),
                ready: s.ready,
                delayed: s.delayed,
                running: s.running,
                dead: s.dead,
                limit: s.limit,
                breaker: match s.breaker {
                    Breaker::Closed => "closed",
                    Breaker::Open => "open",
                    Breaker::Probing => "probing",
                }
                .into(),
                paused: s.paused,
            }
        })
        .collect();
    Ok(Json(QueueView { servers, totals }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeadFilter {
    /// Only this server's dead jobs.
    pub server: Option<String>,
    /// Only this kind (create_key, delete_key, sync_config, reconcile, collect_traffic).
    pub kind: Option<String>,
    /// Only jobs whose error contains this text (case-insensitive).
    pub reason: Option<String>,
    /// At most this many, newest first (1-10000, default 100).
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeadJobView {
    pub id: u64,
    pub server_id: i64,
    pub server: Option<String>,
    pub kind: String,
    /// The job's payload (server, subscription, flags; never credentials).
    pub payload: serde_json::Value,
    pub attempts: u32,
    /// Why it died.
    pub error: String,
    pub dead_at: chrono::DateTime<chrono::Utc>,
}

/// Dead-lettered jobs, newest first.
/// Dead jobs read from Redis per round trip while filtering.
const DEAD_PAGE: usize = 500;

#[utoipa::path(get, path = "/v1/dead-jobs", tag = "queue",
    params(DeadFilter),
    responses(
        (status = 200, body = Vec<DeadJobView>),
        (status = 422, body = ErrorBody),
        Guarded,
    ),
    security(("bearer" = [])))]
pub async fn dead_jobs(
    State(state): State<AppState>,
    caller: Caller,
    Params(filter): Params<DeadFilter>,
) -> ApiResult<Json<Vec<DeadJobView>>> {
    caller.operator()?;
    let limit = filter.limit.unwrap_or(100);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::field(
            "limit",
            format!("{limit} is out of range: use 1..=10000"),
        ));
    }
    let reason = filter.reason.as_ref().map(|r| r.to_lowercase());
    let matches = |d: &DeadJob, server_name: Option<&String>| {
        filter
            .server
            .as_ref()
            .is_none_or(|s| server_name == Some(s))
            && filter.kind.as_ref().is_none_or(|k| &d.kind == k)
            && reason
                .as_ref()
                .is_none_or(|r| d.error.to_lowercase().contains(r))
    };
    let names: HashMap<ServerId, String> = state
        .store
        .list_servers()
        .await?
        .into_iter()
        .map(|s| (s.id, s.name))
        .collect();
    // A page at a time, newest first, until `limit` match: an unfiltered look reads one page.
    let mut jobs = Vec::new();
    let mut skip = 0;
    while jobs.len() < limit {
        let (page, more) = state.queue.dead_jobs_page(skip, DEAD_PAGE).await?;
        skip += DEAD_PAGE;
        for d in page {
            let server = names.get(&d.server).cloned();
            if jobs.len() < limit && matches(&d, server.as_ref()) {
                jobs.push(DeadJobView {
                    id: d.id.0,
                    server_id: d.server.0,
                    server,
                    kind: d.kind,
                    payload: serde_json::from_str(&d.payload)
                        .unwrap_or(serde_json::Value::String(d.payload)),
                    attempts: d.attempts,
                    error: d.error,
                    dead_at: chrono::DateTime::from_timestamp_millis(d.dead_at_ms)
                        .unwrap_or_default(),
                });
            }
        }
        if !more {
            break;
        }
    }
    Ok(Json(jobs))
}

/// Which dead jobs: exactly one of `ids`, `server` or `all: true`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeadSelection {
    pub ids: Option<Vec<u64>>,
    pub server: Option<String>,
    pub all: Option<bool>,
}

impl DeadSelection {
    fn selection(self) -> ApiResult<Selection> {
        match (self.ids, self.server, self.all) {
            (Some(ids), None, None | Some(false)) if !ids.is_empty() => {
                Ok(Selection::Ids(ids.into_iter().map(JobId).collect()))
            }
            (None, Some(server), None | Some(false)) => Ok(Selection::Server(server)),
            (None, None, Some(true)) => Ok(Selection::All),
            _ => Err(ApiError::field(
                "body",
                "give exactly one of: ids (non-empty), server, all: true",
            )),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReplayResult {
    /// Back in their ready queues with fresh attempts.
    pub replayed: Vec<u64>,
    /// A live job does the same operation: the dead one was dropped.
    pub superseded: Vec<u64>,
    /// Asked for, but not in the dead set.
    pub not_dead: Vec<u64>,
}

/// Give dead jobs fresh attempts.
#[utoipa::path(post, path = "/v1/dead-jobs/replay", tag = "queue",
    request_body = DeadSelection,
    responses(
        (status = 200, body = ReplayResult),
        (status = 404, body = ErrorBody),
        BodyRejected, Guarded,
    ),
    security(("bearer" = [])))]
pub async fn replay(
    State(state): State<AppState>,
    caller: Caller,
    Body(selection): Body<DeadSelection>,
) -> ApiResult<Json<ReplayResult>> {
    caller.admin()?;
    let report = dlq::replay(&state.store, &state.queue, selection.selection()?).await?;
    let ids = |v: Vec<JobId>| v.into_iter().map(|j| j.0).collect();
    Ok(Json(ReplayResult {
        replayed: ids(report.replayed),
        superseded: ids(report.superseded),
        not_dead: ids(report.not_dead),
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DiscardResult {
    /// Deleted for good (their keys keep the failure in Postgres).
    pub discarded: Vec<u64>,
}

/// Delete dead jobs for good.
#[utoipa::path(post, path = "/v1/dead-jobs/discard", tag = "queue",
    request_body = DeadSelection,
    responses(
        (status = 200, body = DiscardResult),
        (status = 404, body = ErrorBody),
        BodyRejected, Guarded,
    ),
    security(("bearer" = [])))]
pub async fn discard(
    State(state): State<AppState>,
    caller: Caller,
    Body(selection): Body<DeadSelection>,
) -> ApiResult<Json<DiscardResult>> {
    caller.admin()?;
    let discarded = dlq::purge(&state.store, &state.queue, selection.selection()?).await?;
    Ok(Json(DiscardResult {
        discarded: discarded.into_iter().map(|j| j.0).collect(),
    }))
}

/// The sweeps that can be run on demand.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)] // documents the accepted values; parsed against `Sweep::ALL`
pub enum SweepName {
    Reconcile,
    Expire,
    Configs,
    Traffic,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SweepParams {
    /// Only this server.
    pub server: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SweepResult {
    pub sweep: String,
    /// Server name → jobs found to do.
    pub jobs: std::collections::BTreeMap<String, usize>,
    /// Of those, how many were new (the rest were already queued).
    pub enqueued: usize,
    /// Not-yet-started jobs cancelled because their key is being deleted.
    pub cancelled: u64,
}

/// Run a sweep now: reconcile, expire, configs or traffic. It only enqueues; the work runs in
/// per-server jobs under the limits.
#[utoipa::path(post, path = "/v1/sweeps/{sweep}", tag = "queue",
    params(
        ("sweep" = SweepName, Path, description = "reconcile, expire, configs or traffic"),
        SweepParams,
    ),
    responses(
        (status = 200, body = SweepResult),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody),
        Guarded,
    ),
    security(("bearer" = [])))]
pub async fn sweep(
    State(state): State<AppState>,
    caller: Caller,
    Path(sweep): Path<String>,
    Params(params): Params<SweepParams>,
) -> ApiResult<Json<SweepResult>> {
    caller.admin()?;
    let which = Sweep::ALL
        .into_iter()
        .find(|s| s.name() == sweep)
        .ok_or_else(|| {
            ApiError::field(
                "sweep",
                format!("{sweep:?}: use reconcile, expire, configs or traffic"),
            )
        })?;
    let report = sweeps::run(
        &state.store,
        &state.queue,
        which,
        params.server.as_deref(),
        state.settings.config_ttl,
    )
    .await?;
    Ok(Json(SweepResult {
        sweep: which.name().into(),
        jobs: report.jobs,
        enqueued: report.enqueued,
        cancelled: report.cancelled,
    }))
}
