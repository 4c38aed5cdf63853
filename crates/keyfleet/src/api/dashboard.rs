//! What the dashboard (`/ui`) reads beyond the other resources: who is calling, the fleet in one
//! table (Postgres, the queue's per-server counts and the workers' per-minute rollups joined),
//! job throughput and latency per kind and minute, and recent sweep ticks.

use std::collections::{BTreeMap, HashMap};

use axum::{Json, extract::State};
use chrono::{DateTime, Utc};
use keyfleet_queue::{Breaker, STATS_KEEP_MINUTES};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{
    AppState,
    auth::Caller,
    error::{ApiError, ApiResult, ErrorBody, Guarded, Params},
};
use crate::observe::rollup;

/// The caller, as its token proves.
#[derive(Debug, Serialize, ToSchema)]
pub struct Me {
    /// The token's name.
    pub name: String,
    /// producer, admin or viewer.
    pub role: String,
}

/// Who the token belongs to and what it may do (the dashboard hides what the role cannot do).
#[utoipa::path(get, path = "/v1/me", tag = "dashboard",
    responses(
        (status = 200, body = Me),
        (status = 401, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn me(caller: Caller) -> Json<Me> {
    Json(Me {
        name: caller.name,
        role: caller.role.as_str().into(),
    })
}

/// Minutes the fleet table's request figures cover.
pub const FLEET_WINDOW_MINUTES: i64 = 5;
/// A server whose requests failed at least this often (over at least [`MIN_REQUESTS`]) is in
/// trouble.
const TROUBLE_ERROR_RATE: f64 = 0.2;
const MIN_REQUESTS: i64 = 5;

#[derive(Debug, Serialize, ToSchema)]
pub struct FleetView {
    /// The request figures cover the minutes since this time.
    pub since: DateTime<Utc>,
    pub servers: Vec<FleetRow>,
}

/// One server: its settings, its queue now, and its requests over the last minutes.
#[derive(Debug, Serialize, ToSchema)]
pub struct FleetRow {
    pub name: String,
    /// v2ray or outline.
    pub kind: String,
    pub active: bool,
    /// Paused by an operator.
    pub paused: bool,
    /// The fleet-wide in-flight limit.
    pub max_in_flight: i32,
    /// Claimed jobs and health probes holding one of its slots now.
    pub in_flight: u64,
    pub ready: u64,
    pub delayed: u64,
    pub dead: u64,
    /// closed, open or probing.
    pub breaker: String,
    /// Active keys in Postgres.
    pub keys: i64,
    pub config_generation: i64,
    /// Requests to its API in the window.
    pub requests: i64,
    /// Of those, 5xx answers and requests without a complete answer (timeouts, refused, reset).
    pub errors: i64,
    /// errors / requests (0 without requests).
    pub error_rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// ok, warn (paused, inactive, dead jobs) or trouble (breaker not closed, many errors).
    pub health: String,
    /// Why it is not ok, in words.
    pub problems: Vec<String>,
}

/// Every server in one table; a server in trouble says why.
#[utoipa::path(get, path = "/v1/fleet", tag = "dashboard",
    responses(
        (status = 200, body = FleetView),
        Guarded,
    ),
    security(("bearer" = [])))]
pub async fn fleet(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<FleetView>> {
    caller.operator()?;
    let servers = state.store.list_servers().await?;
    let keys = state.store.active_keys_per_server().await?;
    let queue: HashMap<i64, keyfleet_queue::ServerQueueStats> = state
        .queue
        .server_stats()
        .await?
        .into_iter()
        .map(|s| (s.server.0, s))
        .collect();
    let now = Utc::now().timestamp().div_euclid(60);
    let from = now - FLEET_WINDOW_MINUTES + 1;
    let requests = rollup::requests_by_server(&state.queue.read_stats(from, now).await?);
    let rows = servers
        .into_iter()
        .map(|s| {
            let q = queue.get(&s.id.0);
            let r = requests.get(&s.name).cloned().unwrap_or_default();
            let breaker = match q.map_or(Breaker::Closed, |q| q.breaker) {
                Breaker::Closed => "closed",
                Breaker::Open => "open",
                Breaker::Probing => "probing",
            };
            let error_rate = if r.requests > 0 {
                r.errors as f64 / r.requests as f64
            } else {
                0.0
            };
            let mut row = FleetRow {
                keys: keys.get(&s.id).copied().unwrap_or(0),
                kind: s.kind.as_str().into(),
                active: s.active,
                paused: s.paused || q.is_some_and(|q| q.paused),
                max_in_flight: s.max_in_flight,
                in_flight: q.map_or(0, |q| q.running),
                ready: q.map_or(0, |q| q.ready),
                delayed: q.map_or(0, |q| q.delayed),
                dead: q.map_or(0, |q| q.dead),
                breaker: breaker.into(),
                config_generation: s.config_generation,
                requests: r.requests,
                errors: r.errors,
                error_rate,
                p50_ms: r.p50_ms,
                p99_ms: r.p99_ms,
                health: String::new(),
                problems: Vec::new(),
                name: s.name,
            };
            let (health, problems) = judge(&row);
            row.health = health.into();
            row.problems = problems;
            row
        })
        .collect();
    Ok(Json(FleetView {
        since: DateTime::from_timestamp(from * 60, 0).unwrap_or_default(),
        servers: rows,
    }))
}

/// A server's health at a glance, and why.
fn judge(row: &FleetRow) -> (&'static str, Vec<String>) {
    let mut trouble = Vec::new();
    let mut warn = Vec::new();
    if row.breaker != "closed" {
        trouble.push(format!("circuit breaker {}", row.breaker));
    }
    if row.requests >= MIN_REQUESTS && row.error_rate >= TROUBLE_ERROR_RATE {
        trouble.push(format!("{:.0}% of requests failed", row.error_rate * 100.0));
    }
    if row.paused {
        warn.push("paused by an operator".to_owned());
    }
    if !row.active {
        warn.push("inactive: gets no new keys".to_owned());
    }
    if row.dead > 0 {
        let s = if row.dead == 1 { "" } else { "s" };
        warn.push(format!("{} dead job{s}", row.dead));
    }
    let health = if !trouble.is_empty() {
        "trouble"
    } else if !warn.is_empty() {
        "warn"
    } else {
        "ok"
    };
    trouble.extend(warn);
    (health, trouble)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobStatsParams {
    /// How many minutes back, including the current one (1-180, default 30).
    #[param(minimum = 1, maximum = 180)]
    pub minutes: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobStats {
    /// The first minute of every series.
    pub from: DateTime<Utc>,
    /// Every job kind seen in the range, one point per minute (oldest first).
    pub kinds: Vec<KindSeries>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KindSeries {
    /// create_key, delete_key, sync_config, reconcile or collect_traffic.
    pub kind: String,
    pub points: Vec<KindPoint>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KindPoint {
    /// The minute's start.
    pub at: DateTime<Utc>,
    /// Jobs done (committed and acknowledged) in the minute.
    pub done: i64,
    /// Enqueue → done of those jobs.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Attempts that ended in a retry, or dead.
    pub retried: i64,
    pub dead: i64,
}

/// Jobs done per minute by kind, with their enqueue → done latency, from every worker.
#[utoipa::path(get, path = "/v1/stats/jobs", tag = "dashboard",
    params(JobStatsParams),
    responses(
        (status = 200, body = JobStats),
        (status = 422, body = ErrorBody),
        Guarded,
    ),
    security(("bearer" = [])))]
pub async fn job_stats(
    State(state): State<AppState>,
    caller: Caller,
    Params(params): Params<JobStatsParams>,
) -> ApiResult<Json<JobStats>> {
    caller.operator()?;
    let minutes = params.minutes.unwrap_or(30);
    if !(1..=STATS_KEEP_MINUTES).contains(&minutes) {
        return Err(ApiError::field(
            "minutes",
            format!("{minutes} is out of range: use 1..={STATS_KEEP_MINUTES}"),
        ));
    }
    let now = Utc::now().timestamp().div_euclid(60);
    let from = now - minutes + 1;
    let by_kind = rollup::kinds_by_minute(&state.queue.read_stats(from, now).await?);
    let at = |minute: i64| DateTime::from_timestamp(minute * 60, 0).unwrap_or_default();
    let kinds = by_kind
        .into_iter()
        .map(|(kind, points)| KindSeries {
            kind,
            points: (from..=now)
                .map(|minute| {
                    let p = points.get(&minute).cloned().unwrap_or_default();
                    let outcome = |o: &str| p.outcomes.get(o).copied().unwrap_or(0);
                    KindPoint {
                        at: at(minute),
                        done: p.done,
                        p50_ms: p.p50_ms,
                        p99_ms: p.p99_ms,
                        retried: outcome("retry"),
                        dead: outcome("dead"),
                    }
                })
                .collect(),
        })
        .collect();
    Ok(Json(JobStats {
        from: at(from),
        kinds,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TickParams {
    /// Ticks per sweep, newest first (1-100, default 10).
    #[param(minimum = 1, maximum = 100)]
    pub per_sweep: Option<i64>,
}

/// A scheduled tick of a sweep that fired, and what it found.
#[derive(Debug, Serialize, ToSchema)]
pub struct SweepTickView {
    /// reconcile, expire, configs or traffic.
    pub sweep: String,
    /// The scheduled time.
    pub tick_at: DateTime<Utc>,
    /// The scheduler replica that fired it.
    pub fired_by: String,
    pub fired_at: DateTime<Utc>,
    /// Server name → jobs found to do (absent for ticks fired before findings were kept).
    pub jobs: Option<BTreeMap<String, u64>>,
    /// Jobs found, over all servers.
    pub found: Option<u64>,
    /// Of those, how many were new (the rest were already queued).
    pub enqueued: Option<u64>,
    /// Not-yet-started jobs cancelled because their key is being deleted.
    pub cancelled: Option<u64>,
    pub duration_ms: Option<u64>,
}

/// The recent ticks of each scheduled sweep, with what they found and enqueued.
#[utoipa::path(get, path = "/v1/sweeps", tag = "dashboard",
    params(TickParams),
    responses(
        (status = 200, body = Vec<SweepTickView>),
        (status = 422, body = ErrorBody),
        Guarded,
    ),
    security(("bearer" = [])))]
pub async fn sweep_ticks(
    State(state): State<AppState>,
    caller: Caller,
    Params(params): Params<TickParams>,
) -> ApiResult<Json<Vec<SweepTickView>>> {
    caller.operator()?;
    let per_sweep = params.per_sweep.unwrap_or(10);
    if !(1..=100).contains(&per_sweep) {
        return Err(ApiError::field(
            "per_sweep",
            format!("{per_sweep} is out of range: use 1..=100"),
        ));
    }
    let ticks = state.store.recent_ticks(per_sweep).await?;
    Ok(Json(
        ticks
            .into_iter()
            .map(|t| {
                let f = t.findings;
                SweepTickView {
                    sweep: t.sweep,
                    tick_at: t.tick_at,
                    fired_by: t.fired_by,
                    fired_at: t.fired_at,
                    found: f.as_ref().map(|f| f.jobs.values().sum()),
                    enqueued: f.as_ref().map(|f| f.enqueued),
                    cancelled: f.as_ref().map(|f| f.cancelled),
                    duration_ms: f.as_ref().map(|f| f.duration_ms),
                    jobs: f.map(|f| f.jobs),
                }
            })
            .collect(),
    ))
}
