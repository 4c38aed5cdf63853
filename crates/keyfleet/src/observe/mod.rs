//! Observability: Prometheus metrics and health endpoints, served by every long-running role
//! (`--metrics-listen`) and mountable in any axum app ([`router`]).
//!
//! Metrics are recorded through the `metrics` facade where things happen (the VPN clients, the
//! write-back, the reaper, the executor, the scheduler) and rendered by the process-wide
//! Prometheus recorder ([`recorder`]), installed by a listener and by every worker (whose
//! recordings also feed the dashboard's per-minute rollups, [`rollup`]). Without a recorder every
//! recording is a no-op. The fleet gauges (queue depth per server and state, limits, breakers, claimable work)
//! are not recorded: each scrape of `/metrics` reads them fresh from Redis and Postgres.
//!
//! No label ever holds a secret: `server` is the server's name in keyfleet (never its URL, API key
//! or Outline prefix), `endpoint` a fixed operation name (never a path).

mod fleet;
mod health;
mod http;
pub mod rollup;

use std::{sync::OnceLock, time::Duration};

use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub use fleet::{claimable_jobs, render_fleet};
pub use health::{Health, Progress, Readiness};
pub(crate) use http::start;
pub use http::{router, serve};

/// Gauge (no labels): Σ over servers whose breaker is closed and that are not paused of
/// min(ready + running, limit). What the fleet could be doing now within its limits; KEDA scales
/// workers on it with target = worker concurrency.
pub const CLAIMABLE_JOBS_METRIC: &str = "keyfleet_claimable_jobs";
/// Gauge `{server, state}`, state ∈ ready | delayed | running | dead.
pub const QUEUE_JOBS_METRIC: &str = "keyfleet_queue_jobs";
/// Gauge `{server}`: the fleet-wide in-flight limit.
pub const SERVER_LIMIT_METRIC: &str = "keyfleet_server_limit_requests";
/// Gauge `{server}`: claimed jobs and health probes holding one of the server's slots.
pub const SERVER_IN_FLIGHT_METRIC: &str = "keyfleet_server_in_flight_requests";
/// Gauge `{server}`: 0 closed, 1 open, 2 probing.
pub const SERVER_BREAKER_METRIC: &str = "keyfleet_server_breaker_state";
/// Gauge `{server}`: 1 while an operator has paused the server.
pub const SERVER_PAUSED_METRIC: &str = "keyfleet_server_paused";

/// Counter `{server, kind, outcome}`: how attempts ended (see `worker::executor` for the outcomes).
pub const JOB_OUTCOMES_METRIC: &str = "keyfleet_job_outcomes_total";
/// Histogram `{kind}`: enqueue → done, after the Postgres commit and the acknowledgement in Redis.
pub const JOB_LATENCY_METRIC: &str = "keyfleet_job_latency_seconds";
/// Histogram `{kind}`: enqueue → claimed, first attempts only.
pub const CLAIM_WAIT_METRIC: &str = "keyfleet_claim_wait_seconds";
/// Counter `{sweep}`: sweep runs that completed (their tick committed).
pub const SWEEP_RUNS_METRIC: &str = "keyfleet_sweep_runs_total";
/// Histogram `{sweep}`: how long a completed sweep run took.
pub const SWEEP_DURATION_METRIC: &str = "keyfleet_sweep_duration_seconds";
/// Counter `{sweep}`: jobs a sweep run enqueued (new ones; already-queued operations not counted).
pub const SWEEP_ENQUEUED_METRIC: &str = "keyfleet_sweep_enqueued_jobs_total";
/// Counter `{server, drift}`: keys a reconcile found out of step, drift ∈ missing (wanted, not on
/// the server) | lost (Postgres had it active, gone from the server) | unrecorded (ours on the
/// server under an id Postgres lacks: adopted) | unwanted (ours on the server, not wanted: deleted).
pub const RECONCILE_DRIFT_METRIC: &str = "keyfleet_reconcile_drift_keys_total";
/// Gauge `{version}` = 1.
pub const BUILD_INFO_METRIC: &str = "keyfleet_build_info";

/// Histogram buckets of every duration: 1 ms to 30 s.
pub const SECONDS_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
];
/// Buckets of [`keyfleet_store::WRITEBACK_BATCH_ROWS_METRIC`]: 1 row to a full batch (500).
pub const ROWS_BUCKETS: [f64; 10] = [1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 200.0, 350.0, 500.0];

/// How often histogram samples are folded in when nobody scrapes (bounds their memory).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The dashboard's per-minute rollups, fed by the global recorder ([`recorder`]): collecting only
/// once [`rollup::RollupRecorder::spawn_flusher`] runs.
pub fn rollups() -> &'static rollup::RollupRecorder {
    static ROLLUPS: OnceLock<rollup::RollupRecorder> = OnceLock::new();
    ROLLUPS.get_or_init(rollup::RollupRecorder::default)
}

/// Installs the global recorder once per process (Prometheus, and the rollups beside it); later
/// calls return the same Prometheus handle.
pub fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&SECONDS_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(keyfleet_store::WRITEBACK_BATCH_ROWS_METRIC.to_owned()),
                    &ROWS_BUCKETS,
                )
            })
            .expect("the bucket lists are not empty")
            .build_recorder();
        let handle = recorder.handle();
        let both = metrics_util::layers::FanoutBuilder::default()
            .add_recorder(recorder)
            .add_recorder(rollups().clone())
            .build();
        if let Err(error) = metrics::set_global_recorder(both) {
            tracing::warn!(%error, "Another metrics recorder is installed; /metrics shows only the fleet gauges.");
        }
        describe();
        metrics::gauge!(BUILD_INFO_METRIC, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkeep.run_upkeep();
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "Cannot start the metrics upkeep thread; scrapes still fold samples in.");
        }
        handle
    })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        keyfleet_vpn::REQUEST_DURATION_METRIC,
        Unit::Seconds,
        "Requests to VPN server APIs, by server, API operation and status class (error: no complete response)."
    );
    describe_counter!(
        JOB_OUTCOMES_METRIC,
        "How job attempts ended, by server, job kind and outcome."
    );
    describe_histogram!(
        JOB_LATENCY_METRIC,
        Unit::Seconds,
        "Enqueue to done (committed in Postgres and acknowledged in Redis), by job kind."
    );
    describe_histogram!(
        CLAIM_WAIT_METRIC,
        Unit::Seconds,
        "Enqueue to claimed, first attempts, by job kind."
    );
    describe_histogram!(
        keyfleet_store::WRITEBACK_BATCH_ROWS_METRIC,
        "Results per committed write-back transaction."
    );
    describe_histogram!(
        keyfleet_store::WRITEBACK_COMMIT_METRIC,
        Unit::Seconds,
        "Duration of a committed write-back transaction."
    );
    describe_counter!(
        keyfleet_queue::LEASES_REAPED_METRIC,
        "Jobs and probes taken back because their lease expired (their worker died or stalled)."
    );
    describe_counter!(SWEEP_RUNS_METRIC, "Completed sweep runs, by sweep.");
    describe_histogram!(
        SWEEP_DURATION_METRIC,
        Unit::Seconds,
        "Duration of completed sweep runs, by sweep."
    );
    describe_counter!(
        SWEEP_ENQUEUED_METRIC,
        "Jobs newly enqueued by sweep runs, by sweep."
    );
    describe_counter!(
        RECONCILE_DRIFT_METRIC,
        "Keys reconcile found out of step with Postgres, by server and kind of drift."
    );
    describe_gauge!(
        BUILD_INFO_METRIC,
        "The running keyfleet version (always 1)."
    );
}

/// Milliseconds since the Unix epoch by this host's clock.
pub(crate) fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Seconds from `since_ms` (Unix ms, e.g. Redis's clock at enqueue) to now; 0 if the clocks
/// disagree the other way.
pub(crate) fn seconds_since(since_ms: i64) -> f64 {
    (now_unix_ms() - since_ms).max(0) as f64 / 1000.0
}
