use std::{collections::BTreeMap, sync::Arc, time::Instant};

use parking_lot::Mutex;

use crate::Endpoint;

/// Beyond this many entries the request log stops growing; the counters keep counting.
pub const LOG_CAP: usize = 1_000_000;

/// What a server has received and done since it started or since the last `reset_meter`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct MeterSnapshot {
    pub requests: BTreeMap<Endpoint, u64>,
    pub total_requests: u64,
    /// Requests being handled right now, including their latency sleep.
    pub in_flight: u64,
    pub peak_in_flight: u64,
    /// Creates that stored a user/key.
    pub creates_committed: u64,
    /// Creates answered 409 because the email/id existed.
    pub conflicts: u64,
    /// Creates that stored a second user/key for an email/name that already existed.
    pub duplicates: u64,
    pub deletes_committed: u64,
    pub current_users: u64,
    /// Every request in arrival order, up to [`LOG_CAP`] entries.
    pub log: Vec<LoggedRequest>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LoggedRequest {
    pub endpoint: Endpoint,
    /// Milliseconds since the server started.
    pub at_ms: u64,
    /// The status answered; 0 while the request is in flight or if it was never answered
    /// (connection cut by `set_refusing(true)` or shutdown).
    pub status: u16,
}

impl MeterSnapshot {
    /// Adds `other` into `self`: counters sum, peaks take the maximum, logs merge by `at_ms`.
    pub(crate) fn absorb(&mut self, other: MeterSnapshot) {
        for (endpoint, n) in other.requests {
            *self.requests.entry(endpoint).or_default() += n;
        }
        self.total_requests += other.total_requests;
        self.in_flight += other.in_flight;
        self.peak_in_flight = self.peak_in_flight.max(other.peak_in_flight);
        self.creates_committed += other.creates_committed;
        self.conflicts += other.conflicts;
        self.duplicates += other.duplicates;
        self.deletes_committed += other.deletes_committed;
        self.current_users += other.current_users;
        self.log.extend(other.log);
        self.log.sort_by_key(|r| r.at_ms);
    }
}

pub(crate) struct Meter {
    started: Instant,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    snap: MeterSnapshot,
    /// Bumped by `reset`, so a request that arrived before it does not write into the new log.
    epoch: u64,
}

/// Outcomes a handler reports to the meter.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Outcome {
    Created,
    CreatedDuplicate,
    Conflict,
    Deleted,
}

impl Meter {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            state: Mutex::default(),
        }
    }

    /// Counts a request and keeps it in flight until the returned guard drops.
    pub fn arrive(self: &Arc<Self>, endpoint: Endpoint) -> Visit {
        let at_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut state = self.state.lock();
        let epoch = state.epoch;
        let snap = &mut state.snap;
        *snap.requests.entry(endpoint).or_default() += 1;
        snap.total_requests += 1;
        snap.in_flight += 1;
        snap.peak_in_flight = snap.peak_in_flight.max(snap.in_flight);
        let slot = (snap.log.len() < LOG_CAP).then(|| {
            snap.log.push(LoggedRequest {
                endpoint,
                at_ms,
                status: 0,
            });
            (epoch, snap.log.len() - 1)
        });
        Visit {
            meter: Arc::clone(self),
            slot,
            status: 0,
        }
    }

    pub fn record(&self, outcome: Outcome) {
        let snap = &mut self.state.lock().snap;
        match outcome {
            Outcome::Created => snap.creates_committed += 1,
            Outcome::CreatedDuplicate => {
                snap.creates_committed += 1;
                snap.duplicates += 1;
            }
            Outcome::Conflict => snap.conflicts += 1,
            Outcome::Deleted => snap.deletes_committed += 1,
        }
    }

    pub fn snapshot(&self, current_users: u64) -> MeterSnapshot {
        MeterSnapshot {
            current_users,
            ..self.state.lock().snap.clone()
        }
    }

    /// Zeroes everything but what is in flight right now.
    pub fn reset(&self) {
        let mut state = self.state.lock();
        let in_flight = state.snap.in_flight;
        state.epoch += 1;
        state.snap = MeterSnapshot {
            in_flight,
            peak_in_flight: in_flight,
            ..MeterSnapshot::default()
        };
    }
}

/// A request in flight; dropping it (answered or cancelled) takes it out.
pub(crate) struct Visit {
    meter: Arc<Meter>,
    slot: Option<(u64, usize)>,
    status: u16,
}

impl Visit {
    pub fn answered(&mut self, status: u16) {
        self.status = status;
    }
}

impl Drop for Visit {
    fn drop(&mut self) {
        let mut state = self.meter.state.lock();
        state.snap.in_flight = state.snap.in_flight.saturating_sub(1);
        if let Some((epoch, index)) = self.slot
            && epoch == state.epoch
            && let Some(entry) = state.snap.log.get_mut(index)
        {
            entry.status = self.status;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_peak_and_survives_reset_while_in_flight() {
        let meter = Arc::new(Meter::new());
        let mut a = meter.arrive(Endpoint::ListUsers);
        let b = meter.arrive(Endpoint::CreateUser);
        a.answered(200);
        drop(a);
        meter.reset();
        drop(b);
        let snap = meter.snapshot(0);
        assert_eq!(
            (snap.in_flight, snap.peak_in_flight, snap.total_requests),
            (0, 1, 0)
        );
        assert!(snap.log.is_empty());
        let mut c = meter.arrive(Endpoint::Stats);
        c.answered(503);
        drop(c);
        let snap = meter.snapshot(3);
        assert_eq!(snap.log.len(), 1);
        assert_eq!(snap.log[0].status, 503);
        assert_eq!(snap.requests[&Endpoint::Stats], 1);
        assert_eq!(snap.current_users, 3);
    }
}
