use std::{
    sync::Arc,
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

use crate::{Claim, ClaimedJob, Error, Finish, FinishResult, Queue, QueueConfig, WakeSignal};

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
/// free slot, and each ask is one atomic claim in Redis. With nothing to claim it sleeps until a
/// wake-up (or the idle poll) instead of polling. Redis errors never end the worker: the claim is
/// retried with back-off.
pub struct QueueBackend {
    queue: Queue,
    worker_id: String,
    wake: WakeSignal,
    hooks: Arc<dyn ClaimHooks>,
    state: State,
    error_backoff: Duration,
}

enum State {
    Idle,
    /// The wake generation read before the claim started, so no wake-up can slip between them.
    Claiming(u64, BoxFuture<'static, crate::Result<Claim>>),
    /// Idle (waiting for a wake-up), backing off, or initialising Redis: nothing to finish at stop.
    Waiting(BoxFuture<'static, ()>),
    /// Giving back a job claimed as the worker stopped.
    Releasing(BoxFuture<'static, ()>),
}

impl QueueBackend {
    pub fn new(
        queue: Queue,
        worker_id: impl Into<String>,
        wake: WakeSignal,
        hooks: Arc<dyn ClaimHooks>,
    ) -> Self {
        Self {
            queue,
            worker_id: worker_id.into(),
            wake,
            hooks,
            state: State::Idle,
            error_backoff: MIN_BACKOFF,
        }
    }

    fn wait(&mut self, seen: u64, at_most: Duration) {
        let wake = self.wake.clone();
        self.state = State::Waiting(Box::pin(async move {
            tokio::select! {
                () = wake.changed_since(seen) => {}
                () = tokio::time::sleep(at_most) => {}
            }
        }));
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
                    let queue = self.queue.clone();
                    let worker = self.worker_id.clone();
                    let seen = self.wake.generation();
                    self.state =
                        State::Claiming(seen, Box::pin(async move { queue.claim(&worker).await }));
                }
                State::Claiming(seen, claim) => {
                    let seen = *seen;
                    let claimed = ready!(claim.as_mut().poll(cx));
                    self.hooks.claim_returned();
                    match claimed {
                        Ok(Claim::Job(job)) => {
                            self.state = State::Idle;
                            self.error_backoff = MIN_BACKOFF;
                            return Poll::Ready(Some(Ok(Task::new(job))));
                        }
                        Ok(Claim::Probe(server)) => {
                            self.error_backoff = MIN_BACKOFF;
                            tokio::spawn(self.hooks.probe(server));
                            self.state = State::Idle;
                        }
                        Ok(Claim::Uninitialized) => {
                            self.state = State::Waiting(self.hooks.initialize());
                        }
                        Ok(Claim::Empty { next_due }) => {
                            self.error_backoff = MIN_BACKOFF;
                            let idle = self.queue.config().idle_poll;
                            self.wait(seen, next_due.map_or(idle, |d| d.min(idle)));
                        }
                        Err(error) => {
                            tracing::warn!(%error, worker = %self.worker_id, "Claim failed; backing off.");
                            let delay = self.error_backoff;
                            self.error_backoff = (delay * 2).min(MAX_BACKOFF);
                            self.state = State::Waiting(Box::pin(tokio::time::sleep(delay)));
                        }
                    }
                }
                State::Waiting(wait) | State::Releasing(wait) => {
                    ready!(wait.as_mut().poll(cx));
                    self.state = State::Idle;
                }
            }
        }
    }

    fn poll_close(&mut self, cx: &mut Context<'_>, _: &WorkerContext) -> Poll<Result<(), Error>> {
        // A claim still in flight at shutdown may have taken a job: give it back unstarted.
        if let State::Claiming(_, claim) = &mut self.state {
            let claimed = ready!(claim.as_mut().poll(cx));
            self.state = State::Idle;
            match claimed {
                Ok(Claim::Job(job)) => {
                    let queue = self.queue.clone();
                    let hooks = self.hooks.clone();
                    self.state = State::Releasing(Box::pin(async move {
                        match queue.finish(&job, &Finish::Release).await {
                            Ok((FinishResult::Applied, _)) => hooks.released(&job),
                            Ok(_) => {}
                            Err(error) => {
                                tracing::warn!(%error, job = %job.id, "Could not release a job at shutdown; its lease will expire.")
                            }
                        }
                    }));
                }
                // A probe holds one of the server's slots: run it (the reaper would take it back
                // after a lease otherwise).
                Ok(Claim::Probe(server)) => self.state = State::Releasing(self.hooks.probe(server)),
                _ => {}
            }
        }
        match &mut self.state {
            State::Releasing(release) => {
                ready!(release.as_mut().poll(cx));
                self.state = State::Idle;
            }
            // An idle wait or a back-off has nothing to finish: stop now, not at its end.
            State::Waiting(_) => self.state = State::Idle,
            State::Idle | State::Claiming(..) => {}
        }
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
        self.queue.config()
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> Identity {
        Identity::new()
    }
}
