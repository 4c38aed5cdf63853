use std::{
    task::{Context, Poll, ready},
    time::Duration,
};

use apalis_core::{
    backend::{Backend, BackendConfig, finalize::Ephemeral},
    task::{Task, task_id::RandomId},
    worker::context::WorkerContext,
};
use futures::future::BoxFuture;
use tower::layer::util::Identity;

use keyfleet_core::ServerId;

use crate::{Claim, ClaimedJob, Error, Handoff, QueueConfig};

/// What the backend needs from the process it runs in when a claim returns no job to run.
pub trait ClaimHooks: Send + Sync + 'static {
    /// Redis holds no fence epoch (new, or it lost keyfleet's state): take an epoch from Postgres,
    /// [`Queue::initialize`], and re-derive the lost work if this call initialised it. Claims wait
    /// for it; it must back off by itself while Postgres is unreachable.
    fn initialize(&self) -> BoxFuture<'static, ()>;
    /// The server's circuit breaker is due a health probe: make one cheap request and report it
    /// with [`Queue::probe_result`]. Runs beside the claims.
    fn probe(&self, server: ServerId) -> BoxFuture<'static, ()>;
    /// A claim returned (a job, a probe, nothing to claim, or an error about to be backed off
    /// from): the claim loop is alive. For readiness checks; the default does nothing.
    fn claim_returned(&self) {}
    /// A job claimed as the worker stopped was given back unstarted (no attempt spent).
    fn released(&self, _job: &ClaimedJob) {}
}

/// keyfleet's queue as an apalis backend: the worker asks for a job only when its service has a
/// free slot, and each ask is one atomic claim in Redis, or a job a finish already claimed for it
/// ([`Handoff`]). With nothing to claim it sleeps until a wake-up (or the idle poll) instead of
/// polling. Redis errors never end the worker: the claim is retried with back-off.
pub struct QueueBackend {
    handoff: Handoff,
    worker_id: String,
    state: State,
    error_backoff: Duration,
}

enum State {
    Idle,
    /// The wake generation read before the claim started, so no wake-up can slip between them,
    /// and the claims reserved for it ([`Handoff::reserve`]).
    Claiming(u64, usize, BoxFuture<'static, crate::Result<Vec<Claim>>>),
    /// Idle (waiting for a wake-up), backing off, or initialising Redis: nothing to finish at stop.
    Waiting(BoxFuture<'static, ()>),
    /// Giving back what was claimed for this process as the worker stopped.
    Releasing(BoxFuture<'static, ()>),
}

impl QueueBackend {
    /// One claim loop of a process; the process's claim loops and finishers share `handoff`.
    pub fn new(handoff: Handoff, worker_id: impl Into<String>) -> Self {
        Self {
            handoff,
            worker_id: worker_id.into(),
            state: State::Idle,
            error_backoff: MIN_BACKOFF,
        }
    }

    fn wait(&mut self, seen: u64, at_most: Duration) {
        let wake = self.handoff.wake().clone();
        self.state = State::Waiting(Box::pin(async move {
            tokio::select! {
                () = wake.changed_since(seen) => {}
                () = tokio::time::sleep(at_most) => {}
            }
        }));
    }

    /// Acts on what a claim found; a job is returned for the worker to run.
    fn claimed(&mut self, seen: u64, claimed: crate::Result<Claim>) -> Option<ClaimedJob> {
        let hooks = self.handoff.hooks();
        hooks.claim_returned();
        match claimed {
            Ok(Claim::Job(job)) => {
                self.state = State::Idle;
                self.error_backoff = MIN_BACKOFF;
                return Some(job);
            }
            Ok(Claim::Probe(server)) => {
                self.error_backoff = MIN_BACKOFF;
                tokio::spawn(hooks.probe(server));
                self.state = State::Idle;
            }
            Ok(Claim::Uninitialized) => {
                self.state = State::Waiting(hooks.initialize());
            }
            Ok(Claim::Empty { next_due }) => {
                self.error_backoff = MIN_BACKOFF;
                let idle = self.handoff.queue().config().idle_poll;
                self.wait(seen, next_due.map_or(idle, |d| d.min(idle)));
            }
            Err(error) => {
                tracing::warn!(%error, worker = %self.worker_id, "Claim failed; backing off.");
                let delay = self.error_backoff;
                self.error_backoff = (delay * 2).min(MAX_BACKOFF);
                self.state = State::Waiting(Box::pin(tokio::time::sleep(delay)));
            }
        }
        None
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

impl Backend for QueueBackend {
    type Task = Task<ClaimedJob>;
    type Error = Error;

    fn poll_ready(&mut self, _: &mut Context<'_>, _: &WorkerContext) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, Error>>> {
        loop {
            match &mut self.state {
                State::Idle => {
                    let seen = self.handoff.wake().generation();
                    if let Some(claim) = self.handoff.take() {
                        if let Some(job) = self.claimed(seen, Ok(claim)) {
                            return Poll::Ready(Some(Ok(Task::new(job))));
                        }
                        continue;
                    }
                    let queue = self.handoff.queue().clone();
                    let worker = self.worker_id.clone();
                    let most = self.handoff.reserve();
                    self.state = State::Claiming(
                        seen,
                        most,
                        Box::pin(async move { queue.claim_many(&worker, most).await }),
                    );
                }
                State::Claiming(seen, reserved, claim) => {
                    let (seen, reserved) = (*seen, *reserved);
                    let claimed = ready!(claim.as_mut().poll(cx));
                    let (own, late) = match claimed {
                        Ok(mut claims) => {
                            let own = claims.remove(0);
                            (Ok(own), self.handoff.settle(reserved, claims))
                        }
                        Err(error) => (Err(error), self.handoff.settle(reserved, vec![])),
                    };
                    let job = self.claimed(seen, own);
                    if !late.is_empty() {
                        // The process stopped claiming while this claim was on its way.
                        self.state = State::Releasing(self.handoff.give_back(late));
                    }
                    if let Some(job) = job {
                        return Poll::Ready(Some(Ok(Task::new(job))));
                    }
                }
                // A claim handed over by a finish bumps the wake generation, so an idle wait ends
                // for it as for a wake-up from Redis.
                State::Waiting(wait) | State::Releasing(wait) => {
                    ready!(wait.as_mut().poll(cx));
                    self.state = State::Idle;
                }
            }
        }
    }

    fn poll_close(&mut self, cx: &mut Context<'_>, _: &WorkerContext) -> Poll<Result<(), Error>> {
        // Stop claiming on finishes, and give back what was claimed for this process and no claim
        // loop took: with a claim still in flight at shutdown, that claim's job too (or its probe,
        // which holds one of the server's slots). An idle wait or a back-off has nothing to
        // finish: stop now, not at its end.
        if let State::Claiming(_, reserved, claim) = &mut self.state {
            let reserved = *reserved;
            let claimed = ready!(claim.as_mut().poll(cx));
            let mut claims = self.handoff.close();
            claims.extend(self.handoff.settle(reserved, claimed.unwrap_or_default()));
            self.state = State::Releasing(self.handoff.give_back(claims));
        } else if !matches!(self.state, State::Releasing(_)) {
            self.state = State::Releasing(self.handoff.give_back(self.handoff.close()));
        }
        if let State::Releasing(release) = &mut self.state {
            ready!(release.as_mut().poll(cx));
        }
        self.state = State::Idle;
        Poll::Ready(Ok(()))
    }
}

impl BackendConfig for QueueBackend {
    type Args = ClaimedJob;
    type Id = RandomId;
    type Kind = Ephemeral;
    type Config = QueueConfig;
    type Layer = Identity;

    fn config(&self) -> &QueueConfig {
        self.handoff.queue().config()
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> Identity {
        Identity::new()
    }
}
