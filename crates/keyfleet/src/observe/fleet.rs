//! The fleet gauges: read fresh from Redis (`Queue::server_stats`) and Postgres (server names) at
//! each scrape and rendered as Prometheus text beside the recorder's output. They are not kept in
//! the recorder: a server that leaves the queue leaves the output, and two scrapes at once never
//! mix their samples. Every process renders the same fleet-wide values: aggregate them with
//! `max`, not `sum`.

use std::{collections::HashMap, fmt::Write, sync::OnceLock, time::Duration};

use keyfleet_core::ServerId;
use keyfleet_queue::{Breaker, ServerQueueStats};
use parking_lot::Mutex;

use super::{
    CLAIMABLE_JOBS_METRIC, Health, QUEUE_JOBS_METRIC, SERVER_BREAKER_METRIC,
    SERVER_IN_FLIGHT_METRIC, SERVER_LIMIT_METRIC, SERVER_PAUSED_METRIC,
};

/// How long a scrape waits for Redis and Postgres before it renders without the fleet gauges.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(2);

/// The in-flight limit a claim applies to a server whose limit was never set (`claim.lua`).
const DEFAULT_LIMIT: u32 = 1;

/// The limit claims apply to the server.
fn effective_limit(stats: &ServerQueueStats) -> u32 {
    stats.limit.unwrap_or(DEFAULT_LIMIT)
}

/// Σ over servers whose breaker is closed and that are not paused of min(ready + running, limit):
/// the jobs the fleet could be running now within the limits. Running jobs count, so it does not
/// drop to 0 while the last jobs run (KEDA would scale the workers running them away).
pub fn claimable_jobs(stats: &[ServerQueueStats]) -> u64 {
    stats
        .iter()
        .filter(|s| s.breaker == Breaker::Closed && !s.paused)
        .map(|s| (s.ready + s.running).min(u64::from(effective_limit(s))))
        .sum()
}

fn breaker_value(breaker: Breaker) -> u8 {
    match breaker {
        Breaker::Closed => 0,
        Breaker::Open => 1,
        Breaker::Probing => 2,
    }
}

/// The fleet gauges as Prometheus text. `names` labels each server; a server Postgres does not
/// name has no series of its own (a `server` label is always a name) but counts in the claimable
/// total.
pub fn render_fleet(stats: &[ServerQueueStats], names: &HashMap<ServerId, String>) -> String {
    let named: Vec<(&str, &ServerQueueStats)> = stats
        .iter()
        .filter_map(|s| names.get(&s.server).map(|name| (name.as_str(), s)))
        .collect();
    let mut out = String::new();
    family(
        &mut out,
        QUEUE_JOBS_METRIC,
        "Jobs in the queue, by server and state (ready: both lanes; running: claimed jobs and health probes).",
    );
    for (name, s) in &named {
        for (state, n) in [
            ("ready", s.ready),
            ("delayed", s.delayed),
            ("running", s.running),
            ("dead", s.dead),
        ] {
            let _ = writeln!(
                out,
                "{QUEUE_JOBS_METRIC}{{server=\"{}\",state=\"{state}\"}} {n}",
                escape(name)
            );
        }
    }
    let per_server: [(&str, &str, Gauge); 4] = [
        (
            SERVER_LIMIT_METRIC,
            "The fleet-wide in-flight limit of the server (1 where never set, as claims apply).",
            |s| u64::from(effective_limit(s)),
        ),
        (
            SERVER_IN_FLIGHT_METRIC,
            "Claimed jobs and health probes holding one of the server's slots.",
            |s| s.running,
        ),
        (
            SERVER_BREAKER_METRIC,
            "The server's circuit breaker: 0 closed, 1 open, 2 probing.",
            |s| u64::from(breaker_value(s.breaker)),
        ),
        (
            SERVER_PAUSED_METRIC,
            "1 while an operator has paused the server.",
            |s| u64::from(s.paused),
        ),
    ];
    for (metric, help, value) in per_server {
        family(&mut out, metric, help);
        for (name, s) in &named {
            let _ = writeln!(out, "{metric}{{server=\"{}\"}} {}", escape(name), value(s));
        }
    }
    family(
        &mut out,
        CLAIMABLE_JOBS_METRIC,
        "Jobs the fleet could be running now within the limits: sum over servers with a closed breaker, not paused, of min(ready + running, limit).",
    );
    let _ = writeln!(out, "{CLAIMABLE_JOBS_METRIC} {}", claimable_jobs(stats));
    out
}

/// One per-server gauge's value.
type Gauge = fn(&ServerQueueStats) -> u64;

fn family(out: &mut String, metric: &str, help: &str) {
    let _ = writeln!(out, "# HELP {metric} {help}");
    let _ = writeln!(out, "# TYPE {metric} gauge");
}

/// A label value as the text format wants it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Server names as last read from Postgres: a scrape while Postgres is unreachable still labels
/// the servers it knew (names never change).
fn known_names() -> &'static Mutex<HashMap<ServerId, String>> {
    static NAMES: OnceLock<Mutex<HashMap<ServerId, String>>> = OnceLock::new();
    NAMES.get_or_init(Mutex::default)
}

/// Reads the fleet now and renders it; while Redis cannot be read, a comment saying so instead.
pub(super) async fn sample_and_render(health: &Health) -> String {
    let servers = tokio::time::timeout(SAMPLE_TIMEOUT, health.store.list_servers());
    let stats = tokio::time::timeout(SAMPLE_TIMEOUT, health.queue.server_stats());
    let (servers, stats) = tokio::join!(servers, stats);
    match servers {
        Ok(Ok(servers)) => known_names()
            .lock()
            .extend(servers.into_iter().map(|s| (s.id, s.name))),
        Ok(Err(error)) => {
            tracing::warn!(%error, "Cannot read server names for the fleet gauges; using the last known.")
        }
        Err(_) => tracing::warn!(
            "Reading server names for the fleet gauges timed out; using the last known."
        ),
    }
    let reason = match stats {
        Ok(Ok(stats)) => return render_fleet(&stats, &known_names().lock()),
        Ok(Err(error)) => format!("error: {error}"),
        Err(_) => format!("timed out after {} s", SAMPLE_TIMEOUT.as_secs()),
    };
    tracing::warn!(%reason, "Cannot read the queue for the fleet gauges.");
    format!("# keyfleet: fleet gauges unavailable (redis {reason})\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(id: i64, ready: u64, running: u64, limit: Option<u32>) -> ServerQueueStats {
        ServerQueueStats {
            server: ServerId(id),
            ready,
            delayed: 0,
            running,
            dead: 0,
            limit,
            breaker: Breaker::Closed,
            paused: false,
        }
    }

    #[test]
    fn claimable_counts_what_the_limits_allow_on_open_servers() {
        let stats = vec![
            server(1, 10, 1, Some(4)), // 4: at its limit
            server(2, 1, 1, Some(4)),  // 2
            server(3, 0, 3, Some(4)),  // 3: only running jobs
            server(4, 5, 0, None),     // 1: the default limit
            ServerQueueStats {
                paused: true,
                ..server(5, 9, 0, Some(9))
            }, // 0
            ServerQueueStats {
                breaker: Breaker::Open,
                ..server(6, 9, 0, Some(9))
            }, // 0
            ServerQueueStats {
                breaker: Breaker::Probing,
                ..server(7, 9, 1, Some(9))
            }, // 0
        ];
        assert_eq!(claimable_jobs(&stats), 4 + 2 + 3 + 1);
        assert_eq!(claimable_jobs(&[]), 0);
    }

    #[test]
    fn renders_named_servers_and_escapes_labels() {
        let stats = vec![
            ServerQueueStats {
                delayed: 2,
                dead: 3,
                breaker: Breaker::Probing,
                paused: true,
                ..server(1, 5, 1, Some(2))
            },
            server(2, 7, 0, Some(3)),
        ];
        let names = HashMap::from([(ServerId(1), "de\"1".to_owned())]);
        let text = render_fleet(&stats, &names);
        for line in [
            r#"keyfleet_queue_jobs{server="de\"1",state="ready"} 5"#,
            r#"keyfleet_queue_jobs{server="de\"1",state="delayed"} 2"#,
            r#"keyfleet_queue_jobs{server="de\"1",state="running"} 1"#,
            r#"keyfleet_queue_jobs{server="de\"1",state="dead"} 3"#,
            r#"keyfleet_server_limit_requests{server="de\"1"} 2"#,
            r#"keyfleet_server_in_flight_requests{server="de\"1"} 1"#,
            r#"keyfleet_server_breaker_state{server="de\"1"} 2"#,
            r#"keyfleet_server_paused{server="de\"1"} 1"#,
            // Server 2 has no name: no series, but its work counts.
            "keyfleet_claimable_jobs 3",
            "# TYPE keyfleet_claimable_jobs gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing in:\n{text}"
            );
        }
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 9);
    }
}
