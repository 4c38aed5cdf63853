use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use futures::future::BoxFuture;
use tokio::sync::oneshot;

use crate::{
    BreakerEvent, Claim, ClaimHooks, ClaimedJob, Error, Finish, FinishResult, LeaseRegistry, Queue,
    Result, WakeSignal,
};

/// Claims made for a process's claim loops by its finishes and by its other claim loops. A finish
/// frees a slot that one of the claim loops is about to fill, so [`Handoff::finish`] claims the
/// next job in the same script call ([`Queue::finish_many`], as BullMQ's `moveToFinished` does)
/// and leaves it here; the next [`crate::QueueBackend`] with a free slot takes it instead of
/// claiming from Redis. Finishes that arrive together share one call, and a claim loop claims
/// for the process's other free slots too ([`Handoff::reserve`]). In steady state a job then
/// costs a fraction of a script call.
///
/// Nothing is claimed once the process stops claiming (its claim loops close); a claim that
/// arrives after that is given back by the call that brought it (a job released unstarted, a
/// probe run), and those still waiting here by the claim loop that closes first.
#[derive(Clone)]
pub struct Handoff {
    inner: Arc<Inner>,
}

struct Inner {
    queue: Queue,
    worker_id: String,
    wake: WakeSignal,
    hooks: Arc<dyn ClaimHooks>,
    /// Claims waiting here beyond this are not made: a finish claims only while the process's
    /// claim loops are keeping up.
    capacity: usize,
    /// The process's running attempts (each holds a lease while it runs).
    running: LeaseRegistry,
    state: Mutex<State>,
    finishing: Mutex<Finishing>,
}

/// Finishes on their way to Redis.
#[derive(Default)]
struct Finishing {
    waiting: Vec<Ending>,
    /// A task is sending them ([`Handoff::drive`]).
    driving: bool,
}

struct Ending {
    job: ClaimedJob,
    finish: Finish,
    reply: oneshot::Sender<Result<(FinishResult, BreakerEvent)>>,
}

/// Attempts ended in one script call, at most.
const MAX_FINISHES: usize = 64;
/// Jobs claimed in one script call by a claim loop, at most.
const MAX_CLAIMS: usize = 16;

struct State {
    claims: VecDeque<Claim>,
    /// Claims being made by claim loops for the process's free slots ([`Handoff::reserve`]).
    reserved: usize,
    open: bool,
}

impl Handoff {
    /// `capacity`: the process's concurrency (no more claims than slots can wait here);
    /// `running`: the leases of its running attempts.
    pub fn new(
        queue: Queue,
        worker_id: impl Into<String>,
        wake: WakeSignal,
        hooks: Arc<dyn ClaimHooks>,
        capacity: usize,
        running: LeaseRegistry,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                queue,
                worker_id: worker_id.into(),
                wake,
                hooks,
                capacity: capacity.max(1),
                running,
                state: Mutex::new(State {
                    claims: VecDeque::new(),
                    reserved: 0,
                    open: true,
                }),
                finishing: Mutex::default(),
            }),
        }
    }

    /// Ends an attempt ([`Queue::finish`]) and, while the process is claiming, claims the next job
    /// for its claim loops in the same call. Finishes that arrive while another call is on its way
    /// go together in the next one ([`Queue::finish_many`]): an idle process waits for nothing,
    /// and a busy one makes a fraction of a script call per job.
    pub async fn finish(
        &self,
        job: &ClaimedJob,
        finish: &Finish,
    ) -> Result<(FinishResult, BreakerEvent)> {
        let (reply, answer) = oneshot::channel();
        let drive = {
            let mut finishing = self.inner.finishing.lock().unwrap();
            finishing.waiting.push(Ending {
                job: job.clone(),
                finish: finish.clone(),
                reply,
            });
            !std::mem::replace(&mut finishing.driving, true)
        };
        if drive {
            tokio::spawn(self.clone().drive());
        }
        answer
            .await
            .unwrap_or_else(|_| Err(Error::Reply("the finisher stopped".into())))
    }

    /// Sends the finishes waiting, in calls of at most [`MAX_FINISHES`], until none is left.
    async fn drive(self) {
        loop {
            let endings: Vec<Ending> = {
                let mut finishing = self.inner.finishing.lock().unwrap();
                if finishing.waiting.is_empty() {
                    finishing.driving = false;
                    return;
                }
                let take = finishing.waiting.len().min(MAX_FINISHES);
                finishing.waiting.drain(..take).collect()
            };
            // Claims for the slots these finishes free, as many as the claim loops can take.
            let mut room = self.room();
            let asked: Vec<(&ClaimedJob, &Finish, bool)> = endings
                .iter()
                .map(|e| {
                    let claim = room > 0 && e.finish != Finish::Release;
                    room -= usize::from(claim);
                    (&e.job, &e.finish, claim)
                })
                .collect();
            let inner = &self.inner;
            let answer = inner
                .queue
                .finish_many(&asked, Some(&inner.worker_id))
                .await;
            let results = match answer {
                Ok((results, claims)) => {
                    let late = self.settle(0, claims);
                    // The process stopped claiming while this call was on its way: its finishers
                    // are still waiting (a stopping worker waits for them), so give those back now.
                    self.give_back(late).await;
                    results.into_iter().map(Ok).collect()
                }
                Err(error) => vec![Err(error); endings.len()],
            };
            for (ending, result) in endings.into_iter().zip(results) {
                let _ = ending.reply.send(result);
            }
        }
    }

    /// How many more claims the claim loops can take: none once the process stopped claiming.
    fn room(&self) -> usize {
        let state = self.inner.state.lock().unwrap();
        if state.open {
            self.inner.capacity.saturating_sub(state.claims.len())
        } else {
            0
        }
    }

    /// How many jobs a claim loop with a free slot claims in one call: its own, and one for each
    /// other slot of the process that is free and not being claimed for (at most [`MAX_CLAIMS`]).
    /// So a burst (a purchase's jobs on an idle worker) is claimed in one call, not one per job.
    /// Reserved until [`Handoff::settle`].
    pub(crate) fn reserve(&self) -> usize {
        let running = self.inner.running.len();
        let mut state = self.inner.state.lock().unwrap();
        let busy = running + state.claims.len() + state.reserved;
        let claims = self
            .inner
            .capacity
            .saturating_sub(busy)
            .clamp(1, MAX_CLAIMS);
        state.reserved += claims;
        claims
    }

    /// Leaves claims for the claim loops (Empty and Uninitialized are dropped: the loops find the
    /// same on their next claim), ending a reservation of `reserved` claims (0 for a finish's). When
    /// the process stopped claiming meanwhile, the claims come back, to give back.
    pub(crate) fn settle(&self, reserved: usize, extra: Vec<Claim>) -> Vec<Claim> {
        let mut state = self.inner.state.lock().unwrap();
        state.reserved = state.reserved.saturating_sub(reserved);
        if !state.open {
            return extra;
        }
        let handed = extra
            .into_iter()
            .filter(|claim| matches!(claim, Claim::Job(_) | Claim::Probe(_)))
            .fold(0, |n, claim| {
                state.claims.push_back(claim);
                n + 1
            });
        drop(state);
        if handed > 0 {
            self.inner.wake.notify_local();
        }
        Vec::new()
    }

    /// The oldest claim waiting here, for a claim loop with a free slot.
    pub(crate) fn take(&self) -> Option<Claim> {
        self.inner.state.lock().unwrap().claims.pop_front()
    }

    /// Stops claiming on finishes; returns the claims still waiting here, to give back.
    pub(crate) fn close(&self) -> Vec<Claim> {
        let mut state = self.inner.state.lock().unwrap();
        state.open = false;
        state.claims.drain(..).collect()
    }

    pub(crate) fn queue(&self) -> &Queue {
        &self.inner.queue
    }

    pub(crate) fn wake(&self) -> &WakeSignal {
        &self.inner.wake
    }

    pub(crate) fn hooks(&self) -> &Arc<dyn ClaimHooks> {
        &self.inner.hooks
    }

    /// Releases claimed jobs unstarted (no attempt spent) and runs claimed probes (each holds a
    /// slot of its server until reported).
    pub(crate) fn give_back(&self, claims: Vec<Claim>) -> BoxFuture<'static, ()> {
        let inner = self.inner.clone();
        Box::pin(async move {
            for claim in claims {
                match claim {
                    Claim::Job(job) => match inner.queue.finish(&job, &Finish::Release).await {
                        Ok((FinishResult::Applied, _)) => inner.hooks.released(&job),
                        Ok(_) => {}
                        Err(error) => {
                            tracing::warn!(%error, job = %job.id, "Could not release a job at shutdown; its lease will expire.")
                        }
                    },
                    Claim::Probe(server) => inner.hooks.probe(server).await,
                    Claim::Uninitialized | Claim::Empty { .. } => {}
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use keyfleet_core::{JobPayload, ServerId, SubscriptionId};

    use super::*;
    use crate::QueueConfig;

    struct NoHooks;

    impl ClaimHooks for NoHooks {
        fn initialize(&self) -> BoxFuture<'static, ()> {
            Box::pin(async {})
        }
        fn probe(&self, _: ServerId) -> BoxFuture<'static, ()> {
            Box::pin(async {})
        }
    }

    /// A queue under a fresh prefix, initialised.
    async fn test_queue() -> Queue {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let prefix = format!("kftest:{}", uuid::Uuid::new_v4().simple());
        let queue = Queue::connect(&url, QueueConfig::new(prefix)).unwrap();
        queue.initialize(1).await.unwrap();
        queue
    }

    async fn claim(queue: &Queue) -> ClaimedJob {
        match queue.claim("test").await.unwrap() {
            Claim::Job(job) => job,
            other => panic!("expected a job, got {other:?}"),
        }
    }

    /// Finishes that arrive together are ended together; each hears its own result, and no more
    /// jobs are claimed for the claim loops than they have slots for.
    #[tokio::test]
    async fn finishes_that_arrive_together_each_get_their_result() {
        let queue = test_queue().await;
        queue.set_limits(&[(ServerId(1), 100)]).await.unwrap();
        for i in 0..40 {
            let sub = SubscriptionId::parse(&format!("sub-{i}")).unwrap();
            queue
                .enqueue(&JobPayload::create(ServerId(1), sub))
                .await
                .unwrap();
        }
        let capacity = 8;
        let handoff = Handoff::new(
            queue.clone(),
            "test",
            WakeSignal::spawn(&queue),
            Arc::new(NoHooks),
            capacity,
            LeaseRegistry::default(),
        );
        let mut jobs = vec![];
        for _ in 0..20 {
            jobs.push(claim(&queue).await);
        }
        // One of them is a stale attempt: fenced out, whatever the others in its call do.
        jobs[15].fence -= 1;
        let results = futures::future::join_all(
            jobs.iter()
                .map(|job| async { handoff.finish(job, &Finish::Done).await.unwrap().0 }),
        )
        .await;
        for (i, result) in results.iter().enumerate() {
            let want = if i == 15 {
                FinishResult::Fenced
            } else {
                FinishResult::Applied
            };
            assert_eq!(*result, want, "finish {i}");
        }
        let handed = handoff.close();
        assert_eq!(handed.len(), capacity, "claims for the loops' slots only");
        let stats = queue.stats().await.unwrap();
        assert_eq!(
            (stats.done, stats.running, stats.ready),
            (19, 1 + capacity as u64, 40 - 20 - capacity as u64),
            "{stats:?}"
        );
        queue.purge().await.unwrap();
    }

    /// Finishes claim for the claim loops until the process stops claiming; what is still waiting
    /// then, and a claim that arrives after, is released unstarted.
    #[tokio::test]
    async fn a_stopped_handoff_claims_nothing_and_gives_back_what_it_holds() {
        let queue = test_queue().await;
        queue.set_limits(&[(ServerId(1), 10)]).await.unwrap();
        for i in 0..4 {
            let sub = SubscriptionId::parse(&format!("sub-{i}")).unwrap();
            queue
                .enqueue(&JobPayload::create(ServerId(1), sub))
                .await
                .unwrap();
        }
        let handoff = Handoff::new(
            queue.clone(),
            "test",
            WakeSignal::spawn(&queue),
            Arc::new(NoHooks),
            8,
            LeaseRegistry::default(),
        );
        let seen = handoff.wake().generation();
        let (first, second) = (claim(&queue).await, claim(&queue).await);
        handoff.finish(&first, &Finish::Done).await.unwrap();
        tokio::time::timeout(
            Duration::from_secs(5),
            handoff.wake().clone().changed_since(seen),
        )
        .await
        .expect("a hand-over wakes idle claim loops");
        let waiting = handoff.close();
        assert!(matches!(waiting.as_slice(), [Claim::Job(_)]), "{waiting:?}");
        let stats = queue.stats().await.unwrap();
        assert_eq!((stats.running, stats.ready), (2, 1), "{stats:?}");

        // Closed: the finish leaves nothing claimed, and a claim that arrives now goes back at once.
        handoff.finish(&second, &Finish::Done).await.unwrap();
        assert_eq!(queue.stats().await.unwrap().running, 1);
        let late = Claim::Job(claim(&queue).await);
        let late = handoff.settle(0, vec![late]);
        assert_eq!(late.len(), 1, "refused once closed");
        handoff
            .give_back(waiting.into_iter().chain(late).collect())
            .await;
        let stats = queue.stats().await.unwrap();
        assert_eq!(
            (stats.running, stats.ready, stats.done),
            (0, 2, 2),
            "{stats:?}"
        );
        let mut ready = vec![];
        while let Ok(Claim::Job(job)) = queue.claim("test").await {
            ready.push(job.attempt);
        }
        assert_eq!(ready, [1, 1], "given back unstarted: no attempt spent");
        queue.purge().await.unwrap();
    }
}
