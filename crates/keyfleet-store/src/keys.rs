use chrono::{DateTime, Utc};
use keyfleet_core::{ServerId, SubscriptionId};
use serde::Serialize;
use sqlx::Row;

use crate::{Error, Result, Store};

/// One key of a subscription as `keyfleet status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct KeyStatus {
    pub server: String,
    pub server_id: ServerId,
    pub kind: String,
    pub state: String,
    pub server_key_id: Option<String>,
    pub link_present: bool,
    pub config_synced_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

/// A job result to write back, carrying the fence token of the attempt that produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyWrite {
    /// The key exists on the server with this id and link.
    Created {
        subscription: SubscriptionId,
        server: ServerId,
        fence: i64,
        server_key_id: String,
        link: String,
    },
    /// The key's job was dead-lettered: record why.
    Failed {
        subscription: SubscriptionId,
        server: ServerId,
        fence: i64,
        error: String,
    },
    /// The key is gone from the server.
    Deleted {
        subscription: SubscriptionId,
        server: ServerId,
        fence: i64,
    },
    /// The key's current link, fetched while the server's config generation was `generation`.
    ConfigSynced {
        subscription: SubscriptionId,
        server: ServerId,
        fence: i64,
        link: String,
        generation: i64,
    },
    /// Reconcile found the key missing on the server (e.g. a node wipe): back to pending.
    Lost {
        subscription: SubscriptionId,
        server: ServerId,
        fence: i64,
    },
}

impl KeyWrite {
    pub fn key(&self) -> (&SubscriptionId, ServerId) {
        match self {
            Self::Created {
                subscription,
                server,
                ..
            }
            | Self::Failed {
                subscription,
                server,
                ..
            }
            | Self::Deleted {
                subscription,
                server,
                ..
            }
            | Self::ConfigSynced {
                subscription,
                server,
                ..
            }
            | Self::Lost {
                subscription,
                server,
                ..
            } => (subscription, *server),
        }
    }

    pub fn fence(&self) -> i64 {
        match self {
            Self::Created { fence, .. }
            | Self::Failed { fence, .. }
            | Self::Deleted { fence, .. }
            | Self::ConfigSynced { fence, .. }
            | Self::Lost { fence, .. } => *fence,
        }
    }

    /// Which statement writes it, and its variable columns (text a, text b, number n).
    fn columns(&self) -> (usize, &str, &str, i64) {
        match self {
            Self::Created {
                server_key_id,
                link,
                ..
            } => (0, server_key_id, link, 0),
            Self::Failed { error, .. } => (1, error, "", 0),
            Self::Deleted { .. } => (2, "", "", 0),
            Self::ConfigSynced {
                link, generation, ..
            } => (3, link, "", *generation),
            Self::Lost { .. } => (4, "", "", 0),
        }
    }
}

/// One statement per kind of result, each over `UNNEST` of the batch's column arrays
/// `u(idx, subscription_id, server_id, fence, a, b, n)`. The fence check is in every statement,
/// and each also checks the key is in a state the result may apply to (a create never resurrects a
/// key being deleted).
const WRITE_STATEMENTS: [&str; 5] = [
    "SET state = 'active', server_key_id = u.a, link = u.b, config_synced_at = now(),
         config_generation = s.config_generation, last_error = NULL, fence = u.fence, updated_at = now()
     FROM UNNEST_BATCH, servers s
     WHERE KEY_MATCHES AND s.id = u.server_id AND k.state IN ('pending', 'active', 'failed')",
    "SET state = 'failed', last_error = u.a, fence = u.fence, updated_at = now()
     FROM UNNEST_BATCH
     WHERE KEY_MATCHES AND k.state IN ('pending', 'failed')",
    "SET state = 'deleted', link = NULL, config_synced_at = NULL, deleted_at = now(), last_error = NULL,
         fence = u.fence, updated_at = now()
     FROM UNNEST_BATCH
     WHERE KEY_MATCHES AND k.state IN ('deleting', 'deleted')",
    "SET link = u.a, config_synced_at = now(), config_generation = u.n, fence = u.fence, updated_at = now()
     FROM UNNEST_BATCH
     WHERE KEY_MATCHES AND k.state = 'active'",
    "SET state = 'pending', server_key_id = NULL, link = NULL, config_synced_at = NULL,
         last_error = 'missing on the server at reconcile', fence = u.fence, updated_at = now()
     FROM UNNEST_BATCH
     WHERE KEY_MATCHES AND k.state = 'active'",
];

/// Keys per server with their states, for the demo summary.
#[derive(Debug, Clone, Serialize)]
pub struct ServerKeyCount {
    pub server: String,
    pub active: i64,
    pub with_link: i64,
    pub synced: i64,
    pub other: i64,
}

/// Time from enqueue to key-in-Postgres over the active keys.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LatencyStats {
    pub count: i64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Store {
    /// The per-server state of a subscription's keys; `NotFound` for an unknown subscription.
    pub async fn subscription_status(&self, sub: &SubscriptionId) -> Result<Vec<KeyStatus>> {
        if !self.subscription_exists(sub).await? {
            return Err(Error::NotFound(format!("unknown subscription {sub:?}")));
        }
        let rows = sqlx::query(
            "SELECT s.name, s.id AS server_id, s.kind, k.state, k.server_key_id, k.link IS NOT NULL AS link_present,
                    k.config_synced_at, k.last_error
             FROM keys k JOIN servers s ON s.id = k.server_id
             WHERE k.subscription_id = $1 ORDER BY s.id",
        )
        .bind(sub.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(KeyStatus {
                    server: row.try_get("name")?,
                    server_id: ServerId(row.try_get("server_id")?),
                    kind: row.try_get("kind")?,
                    state: row.try_get("state")?,
                    server_key_id: row.try_get("server_key_id")?,
                    link_present: row.try_get("link_present")?,
                    config_synced_at: row.try_get("config_synced_at")?,
                    last_error: row.try_get("last_error")?,
                })
            })
            .collect()
    }

    /// Writes a batch of results in one transaction, one multi-row statement per kind of result.
    /// Returns, for each input in order, whether it was applied (false: fenced out by a newer attempt,
    /// the key is in a state the result no longer applies to, or the row is gone).
    pub async fn write_keys(&self, batch: &[KeyWrite]) -> Result<Vec<bool>> {
        let mut groups: [Unnested; WRITE_STATEMENTS.len()] = Default::default();
        for (i, write) in batch.iter().enumerate() {
            let (sub, server) = write.key();
            let (statement, a, b, n) = write.columns();
            let g = &mut groups[statement];
            g.index.push(i as i32);
            g.subscriptions.push(sub.as_str().to_owned());
            g.servers.push(server.0);
            g.fences.push(write.fence());
            g.a.push(a.to_owned());
            g.b.push(b.to_owned());
            g.n.push(n);
        }
        let mut applied = vec![false; batch.len()];
        let mut tx = self.pool.begin().await?;
        for (statement, g) in WRITE_STATEMENTS.iter().zip(&groups) {
            if g.index.is_empty() {
                continue;
            }
            let sql = format!("UPDATE keys k {statement} RETURNING u.idx")
                .replace(
                    "UNNEST_BATCH",
                    "UNNEST($1::int[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::text[], $7::bigint[])
                     AS u(idx, subscription_id, server_id, fence, a, b, n)",
                )
                .replace(
                    "KEY_MATCHES",
                    "k.subscription_id = u.subscription_id AND k.server_id = u.server_id AND k.fence <= u.fence",
                );
            let rows = sqlx::query(&sql)
                .bind(&g.index)
                .bind(&g.subscriptions)
                .bind(&g.servers)
                .bind(&g.fences)
                .bind(&g.a)
                .bind(&g.b)
                .bind(&g.n)
                .fetch_all(&mut *tx)
                .await?;
            for row in rows {
                let idx: i32 = row.try_get(0)?;
                applied[idx as usize] = true;
            }
        }
        tx.commit().await?;
        Ok(applied)
    }

    /// Keys per server (all servers, including those without keys).
    pub async fn key_counts(&self) -> Result<Vec<ServerKeyCount>> {
        let rows = sqlx::query(
            "SELECT s.name,
                    count(*) FILTER (WHERE k.state = 'active') AS active,
                    count(k.link) AS with_link,
                    count(k.config_synced_at) AS synced,
                    count(*) FILTER (WHERE k.state IS NOT NULL AND k.state <> 'active') AS other
             FROM servers s LEFT JOIN keys k ON k.server_id = s.id
             GROUP BY s.id, s.name ORDER BY s.id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(ServerKeyCount {
                    server: row.try_get("name")?,
                    active: row.try_get("active")?,
                    with_link: row.try_get("with_link")?,
                    synced: row.try_get("synced")?,
                    other: row.try_get("other")?,
                })
            })
            .collect()
    }

    /// Percentiles of enqueue -> key stored, over active keys.
    pub async fn provision_latency(&self) -> Result<LatencyStats> {
        let row = sqlx::query(
            "SELECT count(*) AS n,
                    coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), 0) AS p50,
                    coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), 0) AS p99,
                    coalesce(max(ms), 0) AS max
             FROM (SELECT (extract(epoch FROM (config_synced_at - enqueued_at)) * 1000)::float8 AS ms
                   FROM keys WHERE state = 'active' AND enqueued_at IS NOT NULL) t",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(LatencyStats {
            count: row.try_get("n")?,
            p50_ms: row.try_get("p50")?,
            p99_ms: row.try_get("p99")?,
            max_ms: row.try_get::<f64, _>("max")?,
        })
    }

    /// How many keys are in each state (for progress displays).
    pub async fn count_keys_in_state(&self, state: &str) -> Result<i64> {
        let row = sqlx::query("SELECT count(*) AS n FROM keys WHERE state = $1")
            .bind(state)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("n")?)
    }
}

/// Column arrays for one `UNNEST` statement.
#[derive(Default)]
struct Unnested {
    index: Vec<i32>,
    subscriptions: Vec<String>,
    servers: Vec<i64>,
    fences: Vec<i64>,
    a: Vec<String>,
    b: Vec<String>,
    n: Vec<i64>,
}

impl Store {
    /// The stored link of one key, if any.
    pub async fn key_link(&self, sub: &SubscriptionId, server: ServerId) -> Result<Option<String>> {
        let row =
            sqlx::query("SELECT link FROM keys WHERE subscription_id = $1 AND server_id = $2")
                .bind(sub.as_str())
                .bind(server.0)
                .fetch_optional(&self.pool)
                .await?;
        Ok(match row {
            Some(row) => row.try_get("link")?,
            None => None,
        })
    }
}

/// A key row as stored, for inspection by tests and tools.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyRow {
    pub state: String,
    pub server_key_id: Option<String>,
    pub link: Option<String>,
    pub fence: i64,
    pub last_error: Option<String>,
    pub updated_at: DateTime<Utc>,
}

impl Store {
    pub async fn key_row(&self, sub: &SubscriptionId, server: ServerId) -> Result<Option<KeyRow>> {
        let row = sqlx::query(
            "SELECT state, server_key_id, link, fence, last_error, updated_at
             FROM keys WHERE subscription_id = $1 AND server_id = $2",
        )
        .bind(sub.as_str())
        .bind(server.0)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(KeyRow {
                state: row.try_get("state")?,
                server_key_id: row.try_get("server_key_id")?,
                link: row.try_get("link")?,
                fence: row.try_get("fence")?,
                last_error: row.try_get("last_error")?,
                updated_at: row.try_get("updated_at")?,
            })
        })
        .transpose()
    }
}

impl Store {
    /// Puts failed keys back to `pending` (their jobs were replayed); the last error stays visible.
    pub async fn mark_failed_keys_pending(
        &self,
        keys: &[(SubscriptionId, ServerId)],
    ) -> Result<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        let subs: Vec<String> = keys.iter().map(|(s, _)| s.as_str().to_owned()).collect();
        let servers: Vec<i64> = keys.iter().map(|(_, s)| s.0).collect();
        let done = sqlx::query(
            "UPDATE keys k SET state = 'pending', updated_at = now()
             FROM UNNEST($1::text[], $2::bigint[]) AS u(subscription_id, server_id)
             WHERE k.subscription_id = u.subscription_id AND k.server_id = u.server_id AND k.state = 'failed'",
        )
        .bind(&subs)
        .bind(&servers)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}
