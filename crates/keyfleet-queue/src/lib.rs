//! keyfleet's Redis queue: per-server ready queues, a fair claim that respects fleet-wide
//! per-server limits, leases with fence tokens, a delayed set for retries and a dead set.
//! It plugs into apalis-core as a [`Backend`](apalis_core::backend::Backend) ([`QueueBackend`]).
//!
//! Invariants: every state change of a job is one Lua script, so it is atomic; no operation scans
//! the backlog (each is O(1) or O(log n) in it, O(servers) at worst); a server never has more
//! claimed jobs than its limit, across every worker process; a finish whose fence token is not the
//! job's current one changes nothing.

mod backend;
mod conn;
mod handoff;
mod leases;
mod retry;
mod scripts;
mod stats;
mod wake;

use std::time::Duration;

use conn::Conn;
use keyfleet_core::{JobPayload, ServerId};
use redis::{Script, ScriptInvocation, Value};

pub use backend::{ClaimHooks, QueueBackend};
pub use conn::RedisMode;
pub use handoff::Handoff;
pub use leases::{LEASES_REAPED_METRIC, LeaseRegistry, spawn_maintenance, spawn_maintenance_with};
pub use retry::backoff;
use scripts::Scripts;
pub use stats::STATS_KEEP_MINUTES;
pub use wake::WakeSignal;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Jobs enqueued in one script call, at most: a call blocks Redis for a few milliseconds at most.
const ENQUEUE_CHUNK: usize = 100;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("invalid REDIS_URL {url:?}: {problem}")]
    BadUrl {
        /// Without its password.
        url: String,
        problem: String,
    },
    #[error("invalid key prefix {0:?}: use 1-64 letters, digits, '-', '_', '.' or ':'")]
    BadPrefix(String),
    #[error("Redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("idempotency key {key:?} already names job {job} with a different payload")]
    IdempotencyConflict { key: String, job: JobId },
    #[error("idempotency key {0:?}… must be 1-200 bytes")]
    BadIdempotencyKey(String),
    #[error("unexpected reply from a queue script: {0}")]
    Reply(String),
}

/// Which of a server's two ready lanes a job waits in. A claim takes the urgent lane first, except
/// that after eight urgent claims in a row while normal jobs wait it takes a normal one: a purchase
/// waits at most for the requests already in flight, and sweeps still get one claim in nine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// What a customer waits for: a purchase's creates, a deprovision's deletes.
    Urgent,
    /// Sweeps, config syncs, repairs.
    Normal,
}

impl Lane {
    fn as_str(self) -> &'static str {
        match self {
            Self::Urgent => "urgent",
            Self::Normal => "normal",
        }
    }
}

/// A job's id in Redis.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct JobId(pub u64);

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Namespace of every key, so deployments and tests can share one Redis.
    pub prefix: String,
    /// How long a claimed job stays leased without a heartbeat before another worker may take it.
    pub lease: Duration,
    /// How long an idle worker waits for a wake-up before it looks again anyway.
    pub idle_poll: Duration,
    /// Consecutive transient failures of a server that open its circuit breaker.
    pub breaker_threshold: u32,
    /// How long an open breaker keeps the server's jobs waiting before the first health probe;
    /// each failed probe doubles it, up to `breaker_cooldown_cap`.
    pub breaker_cooldown: Duration,
    pub breaker_cooldown_cap: Duration,
    /// Dead jobs older than this are dropped (`None`: kept until replayed or purged).
    pub dead_max_age: Option<Duration>,
    /// At most this many dead jobs are kept; the oldest go first.
    pub dead_max_count: Option<u64>,
    /// A standalone Redis, or a cluster (the URL then lists seed nodes).
    pub mode: RedisMode,
}

impl QueueConfig {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            lease: Duration::from_secs(15),
            idle_poll: Duration::from_millis(500),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(5),
            breaker_cooldown_cap: Duration::from_secs(300),
            dead_max_age: Some(Duration::from_secs(30 * 24 * 3600)),
            dead_max_count: Some(100_000),
            mode: RedisMode::Standalone,
        }
    }
}

/// A job a worker holds a lease on.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub id: JobId,
    /// Grows with every claim of any job: a write carrying an older fence loses.
    pub fence: i64,
    /// 1 for the first attempt; counted at claim, so a worker that died mid-job spent one.
    pub attempt: u32,
    pub max_attempts: u32,
    pub server: ServerId,
    /// The payload as enqueued; decoded by the executor, which dead-letters it if malformed.
    pub payload: String,
    pub enqueued_at_ms: i64,
    /// Tries over the job's whole life, replays included: more than 1 means an earlier try may
    /// have reached the server.
    pub tries: u32,
    /// When this process sent the claim: the lease is known to last at least until
    /// `claimed_at + lease` (Redis started it after this instant).
    pub claimed_at: std::time::Instant,
}

impl ClaimedJob {
    /// Whether an earlier try of this job may already have acted on the server.
    pub fn tried_before(&self) -> bool {
        self.attempt > 1 || self.tries > 1
    }
}

/// A job the reaper dead-lettered because its attempts ran out on lost leases.
#[derive(Debug, Clone)]
pub struct BuriedJob {
    pub id: JobId,
    pub payload: String,
    pub fence: i64,
    pub error: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    pub id: JobId,
    /// False when the same operation was already queued: `id` is that job.
    pub created: bool,
}

/// What a claim found.
#[derive(Debug)]
pub enum Claim {
    Job(ClaimedJob),
    /// This server's circuit breaker is due a health probe: the caller probes it (the probe holds
    /// one of the server's slots) and reports with [`Queue::probe_result`].
    Probe(ServerId),
    /// Redis holds no fence epoch: it is new or lost keyfleet's state. Nothing can be claimed until
    /// [`Queue::initialize`] raised the fences past every earlier epoch.
    Uninitialized,
    /// Nothing claimable now; the earliest delayed job is due after this long, if any.
    Empty {
        next_due: Option<Duration>,
    },
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    Done,
    /// Try again after `delay`. `server_fault`: the server failed transiently (counts towards its
    /// circuit breaker); false for failures of keyfleet's own dependencies.
    Retry {
        delay: Duration,
        error: String,
        server_fault: bool,
    },
    Dead {
        error: String,
        server_fault: bool,
    },
    /// Give the job back unstarted (shutdown): no attempt is spent.
    Release,
    /// Run the job again at once under a fresh fence without spending an attempt: its result was
    /// not applied for a reason that is not the job's (Redis handed out an old fence).
    Requeue {
        error: String,
    },
}

/// What an attempt's finish did to its server's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerEvent {
    Unchanged,
    Opened,
    /// A success closed the open breaker: work that failed while it was open may run again.
    Closed,
}

/// How a health probe of an open breaker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOutcome {
    Closed,
    /// Still open, for the doubled cool-down.
    StillOpen,
    /// The probe had outlived its deadline and was taken back; nothing changed.
    Expired,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishResult {
    Applied,
    /// The retry was refused because the attempts are spent: the job is in the dead set.
    DeadLettered,
    /// The attempt's lease was lost and the job moved on: nothing changed.
    Fenced,
}

/// server, kind, payload, attempts, error of a job hash.
type DeadFields = (
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<u32>,
    Option<String>,
);

/// A dead-lettered job as `keyfleet dlq list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadJob {
    pub id: JobId,
    pub server: ServerId,
    pub kind: String,
    pub payload: String,
    pub attempts: u32,
    pub error: String,
    pub dead_at_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayOutcome {
    Replayed,
    /// A live job for the same operation exists; the dead one was dropped.
    Superseded,
    NotDead,
}

/// Counts for progress displays and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueStats {
    pub ready: u64,
    pub running: u64,
    pub delayed: u64,
    pub dead: u64,
    pub done: u64,
}

/// One server's view of the queue, for the API, metrics and the dashboard.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServerQueueStats {
    pub server: ServerId,
    /// Both lanes (`P:nready`).
    pub ready: u64,
    /// Retries waiting for their back-off.
    pub delayed: u64,
    /// Claimed jobs and health probes (`P:inflight`).
    pub running: u64,
    pub dead: u64,
    /// `P:limits`; `None` if never set.
    pub limit: Option<u32>,
    pub breaker: Breaker,
    /// Paused by an operator (`pause_server`): nothing is claimed from it, probes included.
    pub paused: bool,
}

/// A server's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Breaker {
    Closed,
    /// Its jobs wait until a health probe, due after the cool-down, succeeds.
    Open,
    /// A health probe is in flight.
    Probing,
}

/// A server's row of the `server_stats` script: server, ready, delayed, running, dead, limit
/// (-1: none), breaker (0 closed, 1 open, 2 probing), paused by an operator.
type ServerStatsRow = (i64, u64, u64, u64, u64, i64, u8, u8);

/// Bits of a fence below its epoch: an epoch can hand out 2^40 fences.
pub const FENCE_EPOCH_SHIFT: u32 = 40;

/// The queue client: enqueue, claim, finish. Cheap to clone; one multiplexed connection.
#[derive(Clone)]
pub struct Queue {
    client: redis::Client,
    conn: Conn,
    config: QueueConfig,
    scripts: &'static Scripts,
    /// `{P}`: the hash tag, which the scripts receive as ARGV[1] and prepend to every key.
    tag: String,
}

impl Queue {
    /// Connects lazily: an unreachable Redis is retried by each call, it does not fail start-up.
    pub fn connect(redis_url: &str, config: QueueConfig) -> Result<Self> {
        validate_prefix(&config.prefix)?;
        let (conn, client) = conn::connect(redis_url, config.mode)?;
        Ok(Self {
            client,
            conn,
            tag: format!("{{{}}}", config.prefix),
            config,
            scripts: Scripts::get(),
        })
    }

    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// The Redis key `{P}:suffix` of this queue. Every key shares the hash tag `{P}`, so all of a
    /// queue's keys live in one cluster slot and each script's keys are on the node it runs on.
    pub fn redis_key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.tag)
    }

    /// A call of `script`: KEYS[1] is `{P}:epoch`, which routes it to the slot of every key it
    /// touches (on a cluster), and ARGV[1] is the tag `{P}`.
    fn script<'a>(&self, script: &'a Script) -> ScriptInvocation<'a> {
        let mut invocation = script.key(self.redis_key("epoch"));
        invocation.arg(&self.tag);
        invocation
    }

    /// Enqueues a job in the normal lane unless the same operation is already queued or running.
    pub async fn enqueue(&self, payload: &JobPayload) -> Result<Enqueued> {
        self.enqueue_in(Lane::Normal, payload).await
    }

    /// Like [`Queue::enqueue`], in the given lane.
    pub async fn enqueue_in(&self, lane: Lane, payload: &JobPayload) -> Result<Enqueued> {
        self.enqueue_keyed_in(lane, &payload.idempotency_key(), payload)
            .await
    }

    /// Enqueues a job under a caller-chosen idempotency key (e.g. the purchase's order id): while
    /// a job with that key is live, the same payload returns it and another payload is an error.
    pub async fn enqueue_keyed(&self, idem: &str, payload: &JobPayload) -> Result<Enqueued> {
        self.enqueue_keyed_in(Lane::Normal, idem, payload).await
    }

    async fn enqueue_keyed_in(
        &self,
        lane: Lane,
        idem: &str,
        payload: &JobPayload,
    ) -> Result<Enqueued> {
        let mut replies = self.enqueue_script(lane, &[(idem, payload)]).await?;
        replies.remove(0)
    }

    /// Enqueues each job (under its operation's idempotency key) in one script call, so they are
    /// all ready when a worker wakes; each comes back on its own: [`Error::IdempotencyConflict`]
    /// for one refuses that job only.
    async fn enqueue_script(
        &self,
        lane: Lane,
        jobs: &[(&str, &JobPayload)],
    ) -> Result<Vec<Result<Enqueued>>> {
        let mut invocation = self.script(&self.scripts.enqueue);
        for &(idem, payload) in jobs {
            if idem.is_empty() || idem.len() > 200 {
                return Err(Error::BadIdempotencyKey(idem.chars().take(40).collect()));
            }
            invocation
                .arg(idem)
                .arg(payload.to_json())
                .arg(payload.server().0)
                .arg(payload.kind().as_str())
                .arg(payload.kind().max_attempts())
                .arg(payload.key_lock().unwrap_or_default())
                .arg(lane.as_str());
        }
        let reply: Vec<(String, i64)> = invocation.invoke_async(&mut self.conn.clone()).await?;
        if reply.len() != jobs.len() {
            return Err(Error::Reply(format!(
                "enqueue returned {} replies for {} jobs",
                reply.len(),
                jobs.len()
            )));
        }
        jobs.iter()
            .zip(reply)
            .map(|(&(idem, _), (id, code))| {
                let id = JobId(
                    id.parse()
                        .map_err(|_| Error::Reply(format!("job id {id:?}")))?,
                );
                Ok(match code {
                    1 => Ok(Enqueued { id, created: true }),
                    0 => Ok(Enqueued { id, created: false }),
                    _ => Err(Error::IdempotencyConflict {
                        key: idem.to_owned(),
                        job: id,
                    }),
                })
            })
            .collect()
    }

    /// Cancels the not-yet-started jobs of these operations; returns how many were cancelled.
    pub async fn cancel(&self, operations: &[JobPayload]) -> Result<u64> {
        if operations.is_empty() {
            return Ok(0);
        }
        let mut invocation = self.script(&self.scripts.cancel);
        for op in operations {
            invocation.arg(op.idempotency_key());
        }
        Ok(invocation.invoke_async(&mut self.conn.clone()).await?)
    }

    /// Enqueues many jobs in the normal lane, in script calls of up to [`ENQUEUE_CHUNK`].
    pub async fn enqueue_all(&self, payloads: &[JobPayload]) -> Result<Vec<Enqueued>> {
        self.enqueue_all_in(Lane::Normal, payloads).await
    }

    /// Like [`Queue::enqueue_all`], in the given lane; fails on the first idempotency conflict.
    pub async fn enqueue_all_in(
        &self,
        lane: Lane,
        payloads: &[JobPayload],
    ) -> Result<Vec<Enqueued>> {
        self.enqueue_each_in(lane, payloads)
            .await?
            .into_iter()
            .collect()
    }

    /// Like [`Queue::enqueue_all_in`], with each job's outcome on its own: a job whose operation's
    /// live job has another payload is refused ([`Error::IdempotencyConflict`]), the others are
    /// enqueued all the same.
    pub async fn enqueue_each_in(
        &self,
        lane: Lane,
        payloads: &[JobPayload],
    ) -> Result<Vec<Result<Enqueued>>> {
        let keys: Vec<String> = payloads.iter().map(JobPayload::idempotency_key).collect();
        let jobs: Vec<(&str, &JobPayload)> =
            keys.iter().map(String::as_str).zip(payloads).collect();
        let mut replies = Vec::with_capacity(jobs.len());
        for chunk in jobs.chunks(ENQUEUE_CHUNK) {
            replies.extend(self.enqueue_script(lane, chunk).await?);
        }
        Ok(replies)
    }

    /// Sets fleet-wide in-flight limits; takes effect at the next claim.
    pub async fn set_limits(&self, limits: &[(ServerId, u32)]) -> Result<()> {
        if limits.is_empty() {
            return Ok(());
        }
        let mut invocation = self.script(&self.scripts.set_limit);
        for (server, limit) in limits {
            invocation.arg(server.0).arg(*limit);
        }
        let _: i64 = invocation.invoke_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// Claims the next job for `worker`, leasing it for the configured lease time.
    pub async fn claim(&self, worker: &str) -> Result<Claim> {
        let mut claims = self.claim_many(worker, 1).await?;
        Ok(claims.remove(0))
    }

    /// Up to `most` claims in one script call, each as [`Queue::claim`]; they stop at the first
    /// that finds no job or probe, which is returned last. Never empty.
    pub async fn claim_many(&self, worker: &str, most: usize) -> Result<Vec<Claim>> {
        let claimed_at = std::time::Instant::now();
        let reply: Vec<Vec<Value>> = self
            .script(&self.scripts.claim)
            .arg(worker)
            .arg(self.config.lease.as_millis() as u64)
            .arg(self.probe_deadline().as_millis() as u64)
            .arg(most.max(1))
            .invoke_async(&mut self.conn.clone())
            .await?;
        if reply.is_empty() {
            return Err(Error::Reply("claim returned nothing".into()));
        }
        reply
            .into_iter()
            .map(|claim| parse_claim(claim, claimed_at))
            .collect()
    }

    /// How long a health probe may take before the reaper takes its slot back.
    fn probe_deadline(&self) -> Duration {
        self.config.lease
    }

    /// Makes Redis usable after it lost keyfleet's state (or on first use): raises the fence
    /// counter to at least `epoch << FENCE_EPOCH_SHIFT` — past every fence an earlier epoch handed
    /// out, so Postgres never sees a fence go backwards — then marks the queue initialised. `epoch`
    /// must come from Postgres (a sequence), never from Redis. Returns true when this call
    /// initialised the queue.
    pub async fn initialize(&self, epoch: i64) -> Result<bool> {
        self.raise_fence(epoch << FENCE_EPOCH_SHIFT).await?;
        self.mark_initialized(epoch).await
    }

    /// The second half of [`Queue::initialize`], for a caller that re-derives the lost work
    /// before claims may start: raise the fences, enqueue, then mark. Returns true for the one
    /// caller whose mark took effect.
    pub async fn mark_initialized(&self, epoch: i64) -> Result<bool> {
        let initialised: i64 = self
            .script(&self.scripts.init)
            .arg(epoch)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(initialised == 1)
    }

    /// Raises the fence counter to at least `floor` (never lowers it). Exact for any i64: the
    /// increment is computed from a read, and concurrent claims only push the counter higher.
    pub async fn raise_fence(&self, floor: i64) -> Result<()> {
        let current = self.current_fence().await?;
        if current < floor {
            let _: i64 = redis::cmd("INCRBY")
                .arg(self.redis_key("fence"))
                .arg(floor - current)
                .query_async(&mut self.conn.clone())
                .await?;
        }
        Ok(())
    }

    /// The highest fence handed out so far (0 when Redis has none).
    pub async fn current_fence(&self) -> Result<i64> {
        let value: Option<i64> = redis::cmd("GET")
            .arg(self.redis_key("fence"))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(value.unwrap_or(0))
    }

    /// What is wrong with the Redis server's settings for keyfleet, as warnings an operator can act
    /// on: an eviction policy under a memory limit (evicted keys are lost work until the next
    /// recovery), and no persistence (a restart empties the queue: recovery re-derives the work
    /// from Postgres, but retries' back-off and the dead set are gone). Empty when the settings are
    /// right or cannot be read (managed Redis often disables `CONFIG`).
    pub async fn settings_warnings(&self) -> Vec<String> {
        let get = |name: &'static str| {
            let mut conn = self.conn.clone();
            async move {
                let pair: Vec<String> = redis::cmd("CONFIG")
                    .arg("GET")
                    .arg(name)
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                pair.into_iter().nth(1)
            }
        };
        let mut warnings = Vec::new();
        let maxmemory = get("maxmemory").await;
        let policy = get("maxmemory-policy").await;
        if let (Some(limit), Some(policy)) = (&maxmemory, &policy)
            && limit != "0"
            && policy != "noeviction"
        {
            warnings.push(format!(
                "Redis evicts keys under its memory limit (maxmemory {limit}, maxmemory-policy {policy}): set maxmemory-policy noeviction, or queued work can vanish until the next recovery"
            ));
        }
        let appendonly = get("appendonly").await;
        let save = get("save").await;
        if appendonly.as_deref() == Some("no") && save.as_deref() == Some("") {
            warnings.push(
                "Redis keeps nothing on disk (appendonly no, save \"\"): a restart empties the queue; keyfleet re-derives the work from Postgres, but retry back-off and the dead set are lost. Enable appendonly yes for production"
                    .to_owned(),
            );
        }
        let legacy_epoch = format!("{}:epoch", self.config.prefix);
        let legacy: Option<i64> = redis::cmd("EXISTS")
            .arg(&legacy_epoch)
            .query_async(&mut self.conn.clone())
            .await
            .ok();
        if legacy == Some(1) {
            let prefix = &self.config.prefix;
            warnings.push(format!(
                "Redis holds keys of keyfleet's layout before hash tags ({prefix}:*, now {{{prefix}}}:*): stop the older workers; their work is re-derived from Postgres; then delete the old keys (redis-cli --scan --pattern '{prefix}:*' | xargs redis-cli unlink)"
            ));
        }
        warnings
    }

    /// Whether `job` is still running under this attempt's fence (its lease is held).
    pub async fn is_current_attempt(&self, job: &ClaimedJob) -> Result<bool> {
        let (state, fence): (Option<String>, Option<i64>) = redis::cmd("HMGET")
            .arg(self.redis_key(&format!("job:{}", job.id)))
            .arg("state")
            .arg("fence")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(state.as_deref() == Some("running") && fence == Some(job.fence))
    }

    /// Whether Redis holds keyfleet's state (a fence epoch); false after a data loss.
    pub async fn is_initialized(&self) -> Result<bool> {
        let exists: bool = redis::cmd("EXISTS")
            .arg(self.redis_key("epoch"))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(exists)
    }

    /// Ends a health probe that a claim handed out ([`Claim::Probe`]).
    pub async fn probe_result(&self, server: ServerId, healthy: bool) -> Result<ProbeOutcome> {
        let reply: i64 = self
            .script(&self.scripts.probe_result)
            .arg(server.0)
            .arg(u8::from(healthy))
            .arg(self.config.breaker_cooldown_cap.as_millis() as u64)
            .invoke_async(&mut self.conn.clone())
            .await?;
        match reply {
            0 => Ok(ProbeOutcome::Expired),
            1 => Ok(ProbeOutcome::Closed),
            2 => Ok(ProbeOutcome::StillOpen),
            other => Err(Error::Reply(format!("probe_result returned {other}"))),
        }
    }

    /// Applies the dead-set retention (`dead_max_age`, `dead_max_count`); returns how many dead
    /// jobs were dropped.
    pub async fn trim_dead(&self) -> Result<u64> {
        let cutoff = match self.config.dead_max_age {
            Some(age) => (now_unix_ms() - age.as_millis() as i64).max(1),
            None => 0,
        };
        let keep = self.config.dead_max_count.map_or(-1, |n| n as i64);
        let mut dropped = 0;
        loop {
            let n: u64 = self
                .script(&self.scripts.trim_dead)
                .arg(cutoff)
                .arg(keep)
                .arg(TRIM_BATCH)
                .invoke_async(&mut self.conn.clone())
                .await?;
            dropped += n;
            if n < TRIM_BATCH {
                return Ok(dropped);
            }
        }
    }

    /// Deletes dead jobs for good; returns those that were in the dead set.
    pub async fn discard(&self, ids: &[JobId]) -> Result<Vec<JobId>> {
        let mut discarded = Vec::new();
        for chunk in ids.chunks(500) {
            let mut invocation = self.script(&self.scripts.discard);
            for id in chunk {
                invocation.arg(id.0);
            }
            let codes: Vec<i64> = invocation.invoke_async(&mut self.conn.clone()).await?;
            discarded.extend(
                chunk
                    .iter()
                    .zip(codes)
                    .filter(|(_, c)| *c == 1)
                    .map(|(id, _)| *id),
            );
        }
        Ok(discarded)
    }

    /// Ends an attempt. Fenced: if the job's lease was lost to another attempt, nothing changes.
    pub async fn finish(
        &self,
        job: &ClaimedJob,
        finish: &Finish,
    ) -> Result<(FinishResult, BreakerEvent)> {
        let (mut ended, _) = self.finish_many(&[(job, finish, false)], None).await?;
        ended
            .pop()
            .ok_or_else(|| Error::Reply("finish returned no result".into()))
    }

    /// [`Queue::finish`], then, unless the attempt was fenced out, a [`Queue::claim`] for `worker`
    /// in the same script call: the slot the finish frees is claimed again in one round trip.
    pub async fn finish_and_claim(
        &self,
        job: &ClaimedJob,
        finish: &Finish,
        worker: &str,
    ) -> Result<(FinishResult, BreakerEvent, Option<Claim>)> {
        let (mut ended, claims) = self
            .finish_many(&[(job, finish, true)], Some(worker))
            .await?;
        let (result, event) = ended
            .pop()
            .ok_or_else(|| Error::Reply("finish returned no result".into()))?;
        Ok((result, event, claims.into_iter().next()))
    }

    /// Ends several attempts in one script call, each fenced as [`Queue::finish`], and, for each
    /// one that was applied and says `true`, claims a job for `worker` to fill the slot it freed
    /// (as [`Queue::claim`]; the claims stop at the first that finds no job or probe, which is
    /// returned last). Returns each attempt's result in order, and the claims.
    pub async fn finish_many(
        &self,
        endings: &[(&ClaimedJob, &Finish, bool)],
        worker: Option<&str>,
    ) -> Result<(Vec<(FinishResult, BreakerEvent)>, Vec<Claim>)> {
        let claimed_at = std::time::Instant::now();
        let mut invocation = self.script(&self.scripts.finish);
        invocation
            .arg(self.config.breaker_threshold)
            .arg(self.config.breaker_cooldown.as_millis() as u64)
            .arg(worker.unwrap_or(""))
            .arg(self.config.lease.as_millis() as u64)
            .arg(self.probe_deadline().as_millis() as u64);
        for &(job, finish, claim) in endings {
            let (outcome, delay, error, server_fault) = match finish {
                Finish::Done => ("done", Duration::ZERO, "", false),
                Finish::Retry {
                    delay,
                    error,
                    server_fault,
                } => ("retry", *delay, error.as_str(), *server_fault),
                Finish::Dead {
                    error,
                    server_fault,
                } => ("dead", Duration::ZERO, error.as_str(), *server_fault),
                Finish::Release => ("release", Duration::ZERO, "", false),
                Finish::Requeue { error } => ("requeue", Duration::ZERO, error.as_str(), false),
            };
            invocation
                .arg(job.id.0)
                .arg(job.fence)
                .arg(outcome)
                .arg(delay.as_millis() as u64)
                .arg(error)
                .arg(u8::from(server_fault))
                .arg(u8::from(claim && worker.is_some()));
        }
        let (results, claims): (Vec<i64>, Vec<Vec<Value>>) =
            invocation.invoke_async(&mut self.conn.clone()).await?;
        if results.len() != 2 * endings.len() {
            return Err(Error::Reply(format!(
                "finish returned {} values for {} attempts",
                results.len(),
                endings.len()
            )));
        }
        let mut ended = Vec::with_capacity(endings.len());
        for (&(job, _, _), pair) in endings.iter().zip(results.chunks_exact(2)) {
            let event = match pair[1] {
                1 => {
                    tracing::warn!(
                        server_id = %job.server,
                        cooldown = ?self.config.breaker_cooldown,
                        "Circuit breaker opened: the server's jobs wait without spending attempts until a health probe succeeds."
                    );
                    BreakerEvent::Opened
                }
                2 => BreakerEvent::Closed,
                _ => BreakerEvent::Unchanged,
            };
            let result = match pair[0] {
                0 => FinishResult::Fenced,
                1 => FinishResult::Applied,
                2 => FinishResult::DeadLettered,
                other => return Err(Error::Reply(format!("finish returned {other}"))),
            };
            ended.push((result, event));
        }
        let claims = claims
            .into_iter()
            .map(|claim| parse_claim(claim, claimed_at))
            .collect::<Result<_>>()?;
        Ok((ended, claims))
    }

    /// Extends the leases of the attempts (job, fence) still held; returns the attempts whose lease
    /// is lost (the job moved on to another attempt, or is gone: finished meanwhile, or lost with
    /// Redis's data).
    pub async fn heartbeat(&self, held: &[(JobId, i64)]) -> Result<Vec<(JobId, i64)>> {
        if held.is_empty() {
            return Ok(vec![]);
        }
        let mut invocation = self.script(&self.scripts.heartbeat);
        invocation.arg(self.config.lease.as_millis() as u64);
        for (id, fence) in held {
            invocation.arg(id.0).arg(*fence);
        }
        let lost: Vec<i64> = invocation.invoke_async(&mut self.conn.clone()).await?;
        Ok(lost
            .chunks_exact(2)
            .map(|pair| (JobId(pair[0] as u64), pair[1]))
            .collect())
    }

    /// Takes back up to `max` jobs whose lease expired; returns how many, and those of them that
    /// ran out of attempts and were dead-lettered.
    pub async fn reap_expired(&self, max: u32) -> Result<(u64, Vec<BuriedJob>)> {
        let reply: Vec<Value> = self
            .script(&self.scripts.reap)
            .arg(max)
            .invoke_async(&mut self.conn.clone())
            .await?;
        let bad = |what: &str| Error::Reply(format!("reap: {what}"));
        let (count, rest) = reply.split_first().ok_or_else(|| bad("empty reply"))?;
        let count: u64 = redis::from_redis_value_ref(count).map_err(|e| bad(&e.to_string()))?;
        let buried = rest
            .chunks(4)
            .map(|c| match c {
                [id, payload, fence, error] => Ok(BuriedJob {
                    id: JobId(redis::from_redis_value_ref(id).map_err(|e| bad(&e.to_string()))?),
                    payload: redis::from_redis_value_ref(payload)
                        .map_err(|e| bad(&e.to_string()))?,
                    fence: redis::from_redis_value_ref(fence).map_err(|e| bad(&e.to_string()))?,
                    error: redis::from_redis_value_ref(error).map_err(|e| bad(&e.to_string()))?,
                }),
                _ => Err(bad("truncated dead-lettered job")),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((count, buried))
    }

    pub async fn stats(&self) -> Result<QueueStats> {
        let mut conn = self.conn.clone();
        let servers: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.redis_key("servers"))
            .query_async(&mut conn)
            .await?;
        let mut pipe = redis::pipe();
        for s in &servers {
            pipe.cmd("HGET").arg(self.redis_key("nready")).arg(s);
        }
        pipe.cmd("ZCARD").arg(self.redis_key("leases"));
        pipe.cmd("ZCARD").arg(self.redis_key("delayed"));
        pipe.cmd("ZCARD").arg(self.redis_key("dead"));
        pipe.cmd("HGET").arg(self.redis_key("counters")).arg("done");
        let counts: Vec<Option<u64>> = pipe.query_async(&mut conn).await?;
        let n = servers.len();
        Ok(QueueStats {
            ready: counts[..n].iter().map(|c| c.unwrap_or(0)).sum(),
            running: counts[n].unwrap_or(0),
            delayed: counts[n + 1].unwrap_or(0),
            dead: counts[n + 2].unwrap_or(0),
            done: counts[n + 3].unwrap_or(0),
        })
    }

    /// Every server the queue knows (has ever had jobs or a limit, or is paused), sorted by id.
    /// O(servers): one script, no backlog scan.
    pub async fn server_stats(&self) -> Result<Vec<ServerQueueStats>> {
        let rows: Vec<ServerStatsRow> = self
            .script(&self.scripts.server_stats)
            .invoke_async(&mut self.conn.clone())
            .await?;
        let mut stats = rows
            .into_iter()
            .map(
                |(server, ready, delayed, running, dead, limit, breaker, paused)| {
                    Ok(ServerQueueStats {
                        server: ServerId(server),
                        ready,
                        delayed,
                        running,
                        dead,
                        limit: u32::try_from(limit).ok(),
                        breaker: match breaker {
                            0 => Breaker::Closed,
                            1 => Breaker::Open,
                            2 => Breaker::Probing,
                            other => {
                                return Err(Error::Reply(format!("server_stats: breaker {other}")));
                            }
                        },
                        paused: paused == 1,
                    })
                },
            )
            .collect::<Result<Vec<_>>>()?;
        stats.sort_by_key(|s| s.server);
        Ok(stats)
    }

    /// Stops claims from this server (running jobs finish; no health probe is handed out) until
    /// `resume_server`. Returns false if it was already paused.
    pub async fn pause_server(&self, server: ServerId) -> Result<bool> {
        self.hold(server, true).await
    }

    /// Returns false if it was not paused. Makes the server claimable again at once (ring +
    /// wake-up); if its breaker is open, its health probe is due at once.
    pub async fn resume_server(&self, server: ServerId) -> Result<bool> {
        self.hold(server, false).await
    }

    async fn hold(&self, server: ServerId, pause: bool) -> Result<bool> {
        let changed: i64 = self
            .script(&self.scripts.hold)
            .arg(server.0)
            .arg(u8::from(pause))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(changed == 1)
    }

    /// Servers paused by an operator.
    pub async fn paused_servers(&self) -> Result<Vec<ServerId>> {
        let mut held: Vec<i64> = redis::cmd("SMEMBERS")
            .arg(self.redis_key("held"))
            .query_async(&mut self.conn.clone())
            .await?;
        held.sort_unstable();
        Ok(held.into_iter().map(ServerId).collect())
    }

    /// The newest `limit` dead-lettered jobs, newest first.
    pub async fn dead_jobs(&self, limit: usize) -> Result<Vec<DeadJob>> {
        Ok(self.dead_jobs_page(0, limit).await?.0)
    }

    /// `count` dead-lettered jobs after the newest `skip`, newest first, and whether older ones
    /// may follow. For reading the dead set a page at a time.
    pub async fn dead_jobs_page(&self, skip: usize, count: usize) -> Result<(Vec<DeadJob>, bool)> {
        if count == 0 {
            return Ok((vec![], true));
        }
        let mut conn = self.conn.clone();
        let ids: Vec<(u64, i64)> = redis::cmd("ZREVRANGE")
            .arg(self.redis_key("dead"))
            .arg(skip)
            .arg(skip + count - 1)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await?;
        let more = ids.len() == count;
        if ids.is_empty() {
            return Ok((vec![], more));
        }
        let mut pipe = redis::pipe();
        for (id, _) in &ids {
            pipe.cmd("HMGET")
                .arg(self.redis_key(&format!("job:{id}")))
                .arg(&["server", "kind", "payload", "attempts", "error"]);
        }
        let fields: Vec<DeadFields> = pipe.query_async(&mut conn).await?;
        let jobs = ids
            .into_iter()
            .zip(fields)
            .filter_map(
                |((id, dead_at_ms), (server, kind, payload, attempts, error))| {
                    Some(DeadJob {
                        id: JobId(id),
                        server: ServerId(server?),
                        kind: kind.unwrap_or_default(),
                        payload: payload.unwrap_or_default(),
                        attempts: attempts.unwrap_or(0),
                        error: error.unwrap_or_default(),
                        dead_at_ms,
                    })
                },
            )
            .collect();
        Ok((jobs, more))
    }

    /// Moves dead jobs back to their ready queues with fresh attempts.
    pub async fn replay(&self, ids: &[JobId]) -> Result<Vec<(JobId, ReplayOutcome)>> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let mut invocation = self.script(&self.scripts.replay);
            for id in chunk {
                invocation.arg(id.0);
            }
            let codes: Vec<i64> = invocation.invoke_async(&mut self.conn.clone()).await?;
            for (id, code) in chunk.iter().zip(codes) {
                let outcome = match code {
                    1 => ReplayOutcome::Replayed,
                    2 => ReplayOutcome::Superseded,
                    _ => ReplayOutcome::NotDead,
                };
                out.push((*id, outcome));
            }
        }
        Ok(out)
    }

    /// Claimed jobs per server right now (what the limits bound).
    pub async fn in_flight(&self) -> Result<Vec<(ServerId, i64)>> {
        let map: std::collections::HashMap<i64, i64> = redis::cmd("HGETALL")
            .arg(self.redis_key("inflight"))
            .query_async(&mut self.conn.clone())
            .await?;
        let mut v: Vec<(ServerId, i64)> = map.into_iter().map(|(s, n)| (ServerId(s), n)).collect();
        v.sort();
        Ok(v)
    }

    /// Deletes every key under this queue's prefix (tests and the demo start from nothing).
    pub async fn purge(&self) -> Result<u64> {
        let mut cursor = "0".to_owned();
        let mut deleted = 0u64;
        loop {
            let (next, n): (String, u64) = self
                .script(&self.scripts.purge)
                .arg(&cursor)
                .arg(1000)
                .invoke_async(&mut self.conn.clone())
                .await?;
            deleted += n;
            if next == "0" {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    pub(crate) fn wake_channel(&self) -> String {
        self.redis_key("wake")
    }

    pub(crate) fn client(&self) -> &redis::Client {
        &self.client
    }
}

fn validate_prefix(prefix: &str) -> Result<()> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 64
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::BadPrefix(prefix.to_owned()))
    }
}

const TRIM_BATCH: u64 = 1000;

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn parse_claim(reply: Vec<Value>, claimed_at: std::time::Instant) -> Result<Claim> {
    let text = |v: &Value| -> Result<String> {
        redis::from_redis_value_ref::<String>(v).map_err(|e| Error::Reply(format!("claim: {e}")))
    };
    let int = |v: &Value| -> Result<i64> {
        redis::from_redis_value_ref::<i64>(v).map_err(|e| Error::Reply(format!("claim: {e}")))
    };
    match reply.as_slice() {
        [marker, _] if text(marker)? == "!" => Ok(Claim::Uninitialized),
        [marker, server] if text(marker)? == "?" => Ok(Claim::Probe(ServerId(int(server)?))),
        [marker, due] if text(marker)?.is_empty() => {
            let due = int(due)?;
            Ok(Claim::Empty {
                next_due: (due >= 0).then(|| Duration::from_millis(due as u64)),
            })
        }
        [id, payload, attempt, max, fence, server, enqueued_at, tries] => {
            Ok(Claim::Job(ClaimedJob {
                tries: int(tries)? as u32,
                id: JobId(int(id)? as u64),
                payload: text(payload)?,
                attempt: int(attempt)? as u32,
                max_attempts: int(max)? as u32,
                fence: int(fence)?,
                server: ServerId(int(server)?),
                enqueued_at_ms: int(enqueued_at)?,
                claimed_at,
            }))
        }
        other => Err(Error::Reply(format!(
            "claim returned {} values",
            other.len()
        ))),
    }
}
