//! Readiness: Postgres and Redis answer, and (in a worker) the claim loops are alive.

use std::{
    future::Future,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use keyfleet_queue::Queue;
use keyfleet_store::Store;

/// What readiness checks.
#[derive(Clone)]
pub struct Health {
    pub store: Store,
    pub queue: Queue,
    /// A worker's claim loops; `None` for roles without one (the scheduler, an API).
    pub claim_progress: Option<Progress>,
}

/// Each check gets this long; one that takes longer fails as "timed out".
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// A worker's claim loops tick this each time a claim returns (job, empty, or error backed off),
/// and its executor each time a job ends (a slot frees, so a claim follows).
#[derive(Clone, Default)]
pub struct Progress {
    /// Milliseconds since [`process_start`] of the last tick, plus one; 0 = never ticked.
    last: Arc<AtomicI64>,
}

/// A fixed instant of this process that ticks are measured from (monotonic, unlike wall time).
fn process_start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

impl Progress {
    pub fn tick(&self) {
        let start = process_start();
        self.last
            .store(start.elapsed().as_millis() as i64 + 1, Ordering::Relaxed);
    }

    /// How long ago the last tick was; `None` before the first.
    pub fn since_last(&self) -> Option<Duration> {
        let start = process_start();
        match self.last.load(Ordering::Relaxed) {
            0 => None,
            last => {
                let now = start.elapsed().as_millis() as i64;
                Some(Duration::from_millis((now - (last - 1)).max(0) as u64))
            }
        }
    }

    #[cfg(test)]
    fn ticked_ago(ago: Duration) -> Self {
        let progress = Self::default();
        let now = process_start().elapsed().as_millis() as i64;
        progress
            .last
            .store(now - ago.as_millis() as i64 + 1, Ordering::Relaxed);
        progress
    }
}

/// A claim loop that has not ticked for this long is stalled: ten idle polls (5 s at the default
/// 500 ms), and never less than 5 s. An idle loop claims again at least every idle poll, a
/// failing one every back-off (at most 2 s), a busy one each time a job ends.
pub fn claim_loop_stall(idle_poll: Duration) -> Duration {
    (idle_poll * 10).max(Duration::from_secs(5))
}

/// What each check found: `Ok` or what went wrong (never a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub postgres: Result<(), String>,
    pub redis: Result<(), String>,
    /// `None` where there is no claim loop to check.
    pub claim_loop: Option<Result<(), String>>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.postgres.is_ok()
            && self.redis.is_ok()
            && self.claim_loop.as_ref().is_none_or(Result::is_ok)
    }

    /// `{"postgres":"ok","redis":"ok","claim_loop":"ok"}`, each failed check naming what failed.
    pub fn to_json(&self) -> serde_json::Value {
        let text = |r: &Result<(), String>| match r {
            Ok(()) => "ok".to_owned(),
            Err(e) => e.clone(),
        };
        let mut body = serde_json::Map::new();
        body.insert("postgres".into(), text(&self.postgres).into());
        body.insert("redis".into(), text(&self.redis).into());
        if let Some(claim_loop) = &self.claim_loop {
            body.insert("claim_loop".into(), text(claim_loop).into());
        }
        body.into()
    }
}

impl Health {
    /// Runs the checks at once, each bounded by [`CHECK_TIMEOUT`].
    pub async fn check(&self) -> Readiness {
        let postgres = bounded("postgres", async {
            self.store.ping().await.map_err(|e| e.to_string())
        });
        // Any answer will do: the queue answers claims whether or not Redis lost its state (a
        // worker re-initialises it by itself).
        let redis = bounded("redis", async {
            self.queue
                .is_initialized()
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        });
        let (postgres, redis) = tokio::join!(postgres, redis);
        let stall = claim_loop_stall(self.queue.config().idle_poll);
        let claim_loop = self
            .claim_progress
            .as_ref()
            .map(|p| claim_loop_state(p, stall));
        Readiness {
            postgres,
            redis,
            claim_loop,
        }
    }
}

fn claim_loop_state(progress: &Progress, stall: Duration) -> Result<(), String> {
    match progress.since_last() {
        None => Err("not started: no claim has returned yet".to_owned()),
        Some(ago) if ago > stall => Err(format!(
            "stalled: no claim returned and no job ended for {:.1} s",
            ago.as_secs_f64()
        )),
        Some(_) => Ok(()),
    }
}

async fn bounded(
    what: &str,
    check: impl Future<Output = Result<(), String>>,
) -> Result<(), String> {
    match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => {
            tracing::warn!(check = what, %error, "Readiness check failed.");
            Err(format!("error: {error}"))
        }
        Err(_) => {
            tracing::warn!(check = what, "Readiness check timed out.");
            Err(format!("timed out after {} s", CHECK_TIMEOUT.as_secs()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reports_the_time_since_its_last_tick() {
        let progress = Progress::default();
        assert_eq!(progress.since_last(), None);
        progress.tick();
        let clone = progress.clone();
        assert!(clone.since_last().unwrap() < Duration::from_secs(60));
        let old = Progress::ticked_ago(Duration::from_secs(30));
        assert!(old.since_last().unwrap() >= Duration::from_secs(30));
    }

    #[test]
    fn a_claim_loop_that_stopped_ticking_is_not_ready() {
        let stall = claim_loop_stall(Duration::from_millis(500));
        assert_eq!(stall, Duration::from_secs(5));
        assert_eq!(
            claim_loop_stall(Duration::from_secs(2)),
            Duration::from_secs(20)
        );
        assert!(claim_loop_state(&Progress::default(), stall).is_err());
        let fresh = Progress::default();
        fresh.tick();
        assert_eq!(claim_loop_state(&fresh, stall), Ok(()));
        let stalled = claim_loop_state(&Progress::ticked_ago(Duration::from_secs(6)), stall);
        assert!(stalled.unwrap_err().starts_with("stalled"));

        let readiness = Readiness {
            postgres: Ok(()),
            redis: Ok(()),
            claim_loop: Some(Err("stalled: …".into())),
        };
        assert!(!readiness.is_ready());
        assert_eq!(readiness.to_json()["claim_loop"], "stalled: …");
        let scheduler = Readiness {
            claim_loop: None,
            ..readiness
        };
        assert!(scheduler.is_ready());
        assert_eq!(
            scheduler.to_json(),
            serde_json::json!({"postgres": "ok", "redis": "ok"})
        );
    }
}
