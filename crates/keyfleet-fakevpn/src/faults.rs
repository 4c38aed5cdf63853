use std::{
    collections::{HashMap, VecDeque},
    time::Duration,
};

use parking_lot::Mutex;

use crate::Endpoint;

/// What a faulty server does to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer this status without doing anything.
    Status(u16),
    /// Do the operation, then answer this status.
    StatusAfterCommit(u16),
    /// Do the operation, hold the response this long (the client should time out), then answer 504.
    LostResponseAfterCommit(Duration),
    /// Hold this long before doing anything, then answer 504 without doing it.
    Hang(Duration),
    /// `429` with `Retry-After: N`.
    TooManyRequests { retry_after_secs: u64 },
    /// Do the operation, then answer 2xx with a body that is not valid JSON.
    MalformedBody,
    /// Answer 200, without doing the operation, with a body of `bytes` bytes (`[` then spaces, a
    /// prefix of JSON) streamed without `Content-Length`. `u64::MAX` never ends: the client has to
    /// cut it off. The request stays in flight until the body ends or the client goes away.
    OversizedBody { bytes: u64 },
    /// Do the operation, then answer its 2xx JSON with `text` inserted at byte `offset` (clamped to
    /// the length, moved back to a character boundary) of the first string field named `field`, in
    /// document order: in a list, the first entry that has one. No such field: the body is as is.
    InsertIntoField {
        field: String,
        offset: usize,
        text: String,
    },
    /// [`Fault::InsertIntoField`] of a NUL byte into the share link: `link` (V2Ray get link) or
    /// `accessUrl` (Outline keys).
    NulInLink { offset: usize },
    /// Answer this status, without doing the operation, with a body like a debug error page: it
    /// echoes the request line with the full path (an Outline secret prefix), the `X-API-Key`
    /// header and the first user's share link (a made-up one if there is none).
    EchoSecrets(u16),
}

/// Per-request fault probabilities in `[0, 1]`, drawn with the server's seeded RNG. The
/// "after commit" ones only apply to mutating endpoints.
#[derive(Clone, Debug, Default)]
pub struct FaultRates {
    pub status_5xx: f64,
    pub status_after_commit: f64,
    pub lost_response_after_commit: f64,
    pub lost_response_hold: Duration,
    pub hang: f64,
    pub hang_for: Duration,
    pub too_many_requests: f64,
    pub retry_after_secs: u64,
}

#[derive(Default)]
pub(crate) struct Faults {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// `None` holds the faults for any endpoint.
    scripted: HashMap<Option<Endpoint>, VecDeque<Fault>>,
    rates: FaultRates,
}

impl Faults {
    pub fn inject(&self, endpoint: Option<Endpoint>, fault: Fault, times: u32) {
        let mut state = self.state.lock();
        let queue = state.scripted.entry(endpoint).or_default();
        queue.extend(std::iter::repeat_n(fault, times as usize));
    }

    pub fn set_rates(&self, rates: FaultRates) {
        self.state.lock().rates = rates;
    }

    pub fn clear(&self) {
        *self.state.lock() = State::default();
    }

    /// The fault for this request: a scripted one for its endpoint first, then one scripted for
    /// any endpoint, then a random one; `roll` is a uniform draw in `[0, 1)`.
    pub fn take(&self, endpoint: Endpoint, roll: f64) -> Option<Fault> {
        let mut state = self.state.lock();
        for key in [Some(endpoint), None] {
            if let Some(fault) = state.scripted.get_mut(&key).and_then(VecDeque::pop_front) {
                return Some(fault);
            }
        }
        let r = &state.rates;
        let mut candidates = vec![
            (
                r.too_many_requests,
                Fault::TooManyRequests {
                    retry_after_secs: r.retry_after_secs,
                },
            ),
            (r.hang, Fault::Hang(r.hang_for)),
            (r.status_5xx, Fault::Status(500)),
        ];
        if endpoint.is_mutating() {
            candidates.push((r.status_after_commit, Fault::StatusAfterCommit(500)));
            candidates.push((
                r.lost_response_after_commit,
                Fault::LostResponseAfterCommit(r.lost_response_hold),
            ));
        }
        let mut threshold = 0.0;
        for (p, fault) in candidates {
            threshold += if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
            if roll < threshold {
                return Some(fault);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripted_faults_are_fifo_per_endpoint_before_any_endpoint() {
        let faults = Faults::default();
        faults.inject(None, Fault::Status(503), 1);
        faults.inject(Some(Endpoint::CreateUser), Fault::Status(500), 1);
        faults.inject(Some(Endpoint::CreateUser), Fault::MalformedBody, 1);
        assert_eq!(
            faults.take(Endpoint::CreateUser, 0.0),
            Some(Fault::Status(500))
        );
        assert_eq!(
            faults.take(Endpoint::CreateUser, 0.0),
            Some(Fault::MalformedBody)
        );
        assert_eq!(
            faults.take(Endpoint::CreateUser, 0.0),
            Some(Fault::Status(503))
        );
        assert_eq!(faults.take(Endpoint::CreateUser, 0.0), None);
    }

    #[test]
    fn rates_pick_by_cumulative_probability_and_skip_commit_faults_on_reads() {
        let faults = Faults::default();
        faults.set_rates(FaultRates {
            status_5xx: 0.5,
            status_after_commit: 0.5,
            ..FaultRates::default()
        });
        assert_eq!(
            faults.take(Endpoint::ListUsers, 0.25),
            Some(Fault::Status(500))
        );
        assert_eq!(faults.take(Endpoint::ListUsers, 0.75), None);
        assert_eq!(
            faults.take(Endpoint::CreateUser, 0.75),
            Some(Fault::StatusAfterCommit(500))
        );
        faults.clear();
        assert_eq!(faults.take(Endpoint::CreateUser, 0.0), None);
    }
}
