//! Per-minute counters that every worker process adds to (request latency buckets per server, job
//! throughput and latency per kind), for the dashboard. One Redis hash per minute, `P:stats:<minute>`
//! (minutes since the Unix epoch), each field a counter; it expires [`STATS_KEEP_MINUTES`] after
//! its minute. Adding is one `HINCRBY` per field, reading is one `HGETALL` per minute: neither
//! depends on the backlog.

use std::collections::HashMap;

use crate::{Queue, Result};

/// How long a minute's counters are kept.
pub const STATS_KEEP_MINUTES: i64 = 180;

impl Queue {
    /// The one place the name of a minute's hash is made.
    fn stats_key(&self, minute: i64) -> String {
        self.redis_key(&format!("stats:{minute}"))
    }

    /// Adds `counts` (field → increment) to `minute`'s counters, in one round trip.
    pub async fn add_stats(&self, minute: i64, counts: &[(String, i64)]) -> Result<()> {
        if counts.is_empty() {
            return Ok(());
        }
        let key = self.stats_key(minute);
        let mut pipe = redis::pipe();
        for (field, n) in counts {
            pipe.hincr(&key, field, *n).ignore();
        }
        pipe.expire(&key, STATS_KEEP_MINUTES * 60).ignore();
        let () = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// The counters of the minutes `from..=to` that have any, oldest first.
    pub async fn read_stats(&self, from: i64, to: i64) -> Result<Vec<(i64, HashMap<String, i64>)>> {
        let minutes: Vec<i64> = (from..=to).collect();
        if minutes.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for minute in &minutes {
            pipe.hgetall(self.stats_key(*minute));
        }
        let hashes: Vec<HashMap<String, i64>> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(minutes
            .into_iter()
            .zip(hashes)
            .filter(|(_, h)| !h.is_empty())
            .collect())
    }
}
