//! Per-minute rollups for the dashboard, written by every worker process to Redis
//! (`Queue::add_stats`), so any `keyfleet api` shows the whole fleet's figures.
//!
//! A [`metrics::Recorder`] beside the Prometheus one (the same recordings, no new call sites)
//! counts, per minute: each VPN request by server in log-scale latency buckets and whether it
//! failed (`5xx` or no complete response), each job done by kind in the same buckets, and each
//! attempt's outcome by kind. A background task adds the counts to Redis every
//! [`FLUSH_EVERY`]; memory is bounded by servers × kinds × buckets per minute not yet flushed.
//! Only processes that run the flusher collect (the worker); elsewhere the recorder is a no-op.
//!
//! Fields of a minute's hash: `req|<server>|<bucket>`, `reqerr|<server>`, `job|<kind>|<bucket>`,
//! `out|<kind>|<outcome>`. Server names never hold `|` (see `servers::validate_new_server`).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use keyfleet_queue::{Queue, STATS_KEEP_MINUTES};
use metrics::{
    Counter, CounterFn, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use parking_lot::Mutex;

use super::{JOB_LATENCY_METRIC, JOB_OUTCOMES_METRIC};

/// How often the counts reach Redis.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Four buckets per doubling: bucket `i` holds durations up to 2^(i/4) ms (19 % apart).
const BUCKETS_PER_DOUBLING: f64 = 4.0;
/// The last bucket: 2^(88/4) ms ≈ 70 min.
const MAX_BUCKET: u32 = 88;

/// The bucket of a duration in seconds.
pub fn bucket_of(seconds: f64) -> u32 {
    let ms = seconds * 1e3;
    if !ms.is_finite() || ms <= 1.0 {
        return 0;
    }
    ((ms.log2() * BUCKETS_PER_DOUBLING).ceil() as u32).min(MAX_BUCKET)
}

/// The upper bound of a bucket, in milliseconds.
pub fn bucket_ms(bucket: u32) -> f64 {
    2f64.powf(f64::from(bucket) / BUCKETS_PER_DOUBLING)
}

/// The `q` quantile (0..=1) of bucket counts, as the upper bound of its bucket; `None` if empty.
pub fn quantile_ms(buckets: &BTreeMap<u32, i64>, q: f64) -> Option<f64> {
    let total: i64 = buckets.values().sum();
    if total <= 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as i64;
    let mut seen = 0;
    for (bucket, n) in buckets {
        seen += n;
        if seen >= rank {
            return Some(bucket_ms(*bucket));
        }
    }
    buckets.keys().last().map(|b| bucket_ms(*b))
}

fn minute_now() -> i64 {
    chrono::Utc::now().timestamp().div_euclid(60)
}

#[derive(Default)]
struct Counts {
    enabled: AtomicBool,
    /// minute → field → count.
    pending: Mutex<HashMap<i64, HashMap<String, i64>>>,
}

impl Counts {
    fn add(&self, field: String, n: i64) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        *self
            .pending
            .lock()
            .entry(minute_now())
            .or_default()
            .entry(field)
            .or_default() += n;
    }

    fn take(&self) -> HashMap<i64, HashMap<String, i64>> {
        std::mem::take(&mut *self.pending.lock())
    }

    /// Puts counts that could not be written back, dropping minutes Redis would not keep anyway.
    fn put_back(&self, minute: i64, fields: HashMap<String, i64>) {
        if minute < minute_now() - STATS_KEEP_MINUTES {
            return;
        }
        let mut pending = self.pending.lock();
        let into = pending.entry(minute).or_default();
        for (field, n) in fields {
            *into.entry(field).or_default() += n;
        }
    }
}

/// The recorder half: hands out handles for the three metrics the rollups keep, no-ops otherwise.
#[derive(Clone, Default)]
pub struct RollupRecorder {
    counts: Arc<Counts>,
}

fn label<'a>(key: &'a Key, name: &str) -> &'a str {
    key.labels()
        .find(|l| l.key() == name)
        .map_or("", |l| l.value())
}

struct LatencyInto {
    counts: Arc<Counts>,
    prefix: String,
    /// Also counted as a failed request.
    error_field: Option<String>,
}

impl HistogramFn for LatencyInto {
    fn record(&self, seconds: f64) {
        self.counts
            .add(format!("{}|{}", self.prefix, bucket_of(seconds)), 1);
        if let Some(field) = &self.error_field {
            self.counts.add(field.clone(), 1);
        }
    }
}

struct CountInto {
    counts: Arc<Counts>,
    field: String,
}

impl CounterFn for CountInto {
    fn increment(&self, n: u64) {
        self.counts.add(self.field.clone(), n as i64);
    }

    fn absolute(&self, _: u64) {}
}

impl Recorder for RollupRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        if key.name() != JOB_OUTCOMES_METRIC || !self.counts.enabled.load(Ordering::Relaxed) {
            return Counter::noop();
        }
        Counter::from_arc(Arc::new(CountInto {
            counts: Arc::clone(&self.counts),
            field: format!("out|{}|{}", label(key, "kind"), label(key, "outcome")),
        }))
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        if !self.counts.enabled.load(Ordering::Relaxed) {
            return Histogram::noop();
        }
        let (prefix, error_field) = match key.name() {
            keyfleet_vpn::REQUEST_DURATION_METRIC => {
                let server = label(key, "server");
                let failed = matches!(label(key, "status"), "5xx" | "error");
                (
                    format!("req|{server}"),
                    failed.then(|| format!("reqerr|{server}")),
                )
            }
            JOB_LATENCY_METRIC => (format!("job|{}", label(key, "kind")), None),
            _ => return Histogram::noop(),
        };
        Histogram::from_arc(Arc::new(LatencyInto {
            counts: Arc::clone(&self.counts),
            prefix,
            error_field,
        }))
    }
}

impl RollupRecorder {
    /// Starts collecting and adds the counts to Redis every [`FLUSH_EVERY`] until aborted.
    pub fn spawn_flusher(&self, queue: Queue) -> Flusher {
        self.counts.enabled.store(true, Ordering::Relaxed);
        let counts = Arc::clone(&self.counts);
        let task = tokio::spawn({
            let counts = Arc::clone(&counts);
            let queue = queue.clone();
            async move {
                let mut every = tokio::time::interval(FLUSH_EVERY);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    flush(&counts, &queue).await;
                }
            }
        });
        Flusher {
            counts,
            queue,
            task,
        }
    }
}

async fn flush(counts: &Counts, queue: &Queue) {
    for (minute, fields) in counts.take() {
        let list: Vec<(String, i64)> = fields.iter().map(|(f, n)| (f.clone(), *n)).collect();
        if let Err(error) = queue.add_stats(minute, &list).await {
            tracing::debug!(%error, "Cannot write the dashboard's rollups yet; keeping them.");
            counts.put_back(minute, fields);
        }
    }
}

/// The background task of [`RollupRecorder::spawn_flusher`].
pub struct Flusher {
    counts: Arc<Counts>,
    queue: Queue,
    task: tokio::task::JoinHandle<()>,
}

impl Flusher {
    /// Stops the task and writes what is left (at shutdown).
    pub async fn stop(self) {
        self.task.abort();
        flush(&self.counts, &self.queue).await;
    }
}

/// What the rollups of some minutes say about one server's requests.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RequestSummary {
    pub requests: i64,
    pub errors: i64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// One minute of one job kind.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct KindMinute {
    pub done: i64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Attempts by outcome (done, retry, dead, ...).
    pub outcomes: BTreeMap<String, i64>,
}

/// A field of a minute's hash, parsed.
enum Field<'a> {
    Request { server: &'a str, bucket: u32 },
    RequestError { server: &'a str },
    Job { kind: &'a str, bucket: u32 },
    Outcome { kind: &'a str, outcome: &'a str },
}

impl<'a> Field<'a> {
    fn parse(field: &'a str) -> Option<Self> {
        let mut parts = field.split('|');
        let field = match (parts.next()?, parts.next()?, parts.next()) {
            ("req", server, Some(b)) => Self::Request {
                server,
                bucket: b.parse().ok()?,
            },
            ("reqerr", server, None) => Self::RequestError { server },
            ("job", kind, Some(b)) => Self::Job {
                kind,
                bucket: b.parse().ok()?,
            },
            ("out", kind, Some(outcome)) => Self::Outcome { kind, outcome },
            _ => return None,
        };
        parts.next().is_none().then_some(field)
    }
}

type Buckets = BTreeMap<String, BTreeMap<u32, i64>>;

fn count_into(buckets: &mut Buckets, name: &str, bucket: u32, n: i64) {
    *buckets
        .entry(name.to_owned())
        .or_default()
        .entry(bucket)
        .or_default() += n;
}

/// Per server name, the requests of all the minutes given.
pub fn requests_by_server(
    minutes: &[(i64, HashMap<String, i64>)],
) -> BTreeMap<String, RequestSummary> {
    let mut buckets = Buckets::new();
    let mut out: BTreeMap<String, RequestSummary> = BTreeMap::new();
    for (field, n) in minutes.iter().flat_map(|(_, fields)| fields) {
        match Field::parse(field) {
            Some(Field::Request { server, bucket }) => {
                count_into(&mut buckets, server, bucket, *n);
                out.entry(server.to_owned()).or_default().requests += n;
            }
            Some(Field::RequestError { server }) => {
                out.entry(server.to_owned()).or_default().errors += n;
            }
            _ => {}
        }
    }
    for (server, summary) in &mut out {
        if let Some(b) = buckets.get(server) {
            summary.p50_ms = quantile_ms(b, 0.5);
            summary.p99_ms = quantile_ms(b, 0.99);
        }
    }
    out
}

/// Per job kind, per minute (oldest first): jobs done, their enqueue → done latency, outcomes.
pub fn kinds_by_minute(
    minutes: &[(i64, HashMap<String, i64>)],
) -> BTreeMap<String, BTreeMap<i64, KindMinute>> {
    let mut out: BTreeMap<String, BTreeMap<i64, KindMinute>> = BTreeMap::new();
    for (minute, fields) in minutes {
        let mut buckets = Buckets::new();
        for (field, n) in fields {
            match Field::parse(field) {
                Some(Field::Job { kind, bucket }) => count_into(&mut buckets, kind, bucket, *n),
                Some(Field::Outcome { kind, outcome }) => {
                    *out.entry(kind.to_owned())
                        .or_default()
                        .entry(*minute)
                        .or_default()
                        .outcomes
                        .entry(outcome.to_owned())
                        .or_default() += n;
                }
                _ => {}
            }
        }
        for (kind, b) in buckets {
            let point = out.entry(kind).or_default().entry(*minute).or_default();
            point.done = b.values().sum();
            point.p50_ms = quantile_ms(&b, 0.5);
            point.p99_ms = quantile_ms(&b, 0.99);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_a_fifth_apart_and_bound_their_durations() {
        assert_eq!(bucket_of(0.0), 0);
        assert_eq!(bucket_of(f64::NAN), 0);
        for ms in [1.5, 3.0, 49.0, 50.0, 51.0, 100.0, 999.0, 12_345.0] {
            let b = bucket_of(ms / 1e3);
            assert!(bucket_ms(b) >= ms - 1e-9, "{ms} ms in bucket {b}");
            assert!(
                bucket_ms(b) < ms * 1.2 + 1e-9,
                "{ms} ms: bucket {b} is too wide"
            );
        }
        assert_eq!(bucket_of(1e9), MAX_BUCKET);
    }

    #[test]
    fn quantiles_come_from_the_buckets() {
        let mut b = BTreeMap::new();
        b.insert(bucket_of(0.010), 98);
        b.insert(bucket_of(0.200), 2);
        let p50 = quantile_ms(&b, 0.5).unwrap();
        let p99 = quantile_ms(&b, 0.99).unwrap();
        assert!((10.0..12.0).contains(&p50), "{p50}");
        assert!((200.0..240.0).contains(&p99), "{p99}");
        assert_eq!(quantile_ms(&BTreeMap::new(), 0.5), None);
    }

    #[test]
    fn summaries_add_up_minutes_and_keep_servers_and_kinds_apart() {
        let m = |pairs: &[(&str, i64)]| -> HashMap<String, i64> {
            pairs.iter().map(|(f, n)| ((*f).to_owned(), *n)).collect()
        };
        let minutes = vec![
            (
                10,
                m(&[
                    ("req|de-1|20", 3),
                    ("reqerr|de-1", 1),
                    ("req|nl-1|30", 1),
                    ("job|create_key|24", 2),
                    ("out|create_key|done", 2),
                    ("out|create_key|retry", 1),
                ]),
            ),
            (11, m(&[("req|de-1|20", 1), ("job|create_key|28", 1)])),
        ];
        let servers = requests_by_server(&minutes);
        assert_eq!(servers["de-1"].requests, 4);
        assert_eq!(servers["de-1"].errors, 1);
        assert_eq!(servers["de-1"].p50_ms, Some(bucket_ms(20)));
        assert_eq!(servers["nl-1"].requests, 1);
        let kinds = kinds_by_minute(&minutes);
        let create = &kinds["create_key"];
        assert_eq!(create[&10].done, 2);
        assert_eq!(create[&10].outcomes["retry"], 1);
        assert_eq!(create[&11].done, 1);
        assert_eq!(create[&11].p99_ms, Some(bucket_ms(28)));
    }
}
