use std::collections::HashMap;

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
    /// The key's job was dead-lettered: record why, and whether the failure was transient (its
    /// attempts ran out on errors that may pass: [`Store::requeue_failed_keys`] may try again).
    Failed {
        subscription: SubscriptionId,
        server: ServerId,
        fence: i64,
        error: String,
        transient: bool,
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

    /// Which statement of `keyfleet_write_keys` writes it (0 created, 1 failed, 2 deleted, 3 config
    /// synced, 4 lost), and its variable columns (text a, text b, number n; for `Failed`, n is 1
    /// when the failure was transient).
    fn columns(&self) -> (usize, &str, &str, i64) {
        match self {
            Self::Created {
                server_key_id,
                link,
                ..
            } => (CREATED, server_key_id, link, 0),
            Self::Failed {
                error, transient, ..
            } => (1, error, "", i64::from(*transient)),
            Self::Deleted { .. } => (2, "", "", 0),
            Self::ConfigSynced {
                link, generation, ..
            } => (3, link, "", *generation),
            Self::Lost { .. } => (4, "", "", 0),
        }
    }
}

/// Why a result was or was not written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum WriteOutcome {
    Applied,
    /// A newer attempt already wrote the key: the row's fence is greater than the result's (or a
    /// result of a newer attempt for the same key was in the same batch, and this one was not tried).
    Fenced {
        row_fence: i64,
    },
    /// The fence allowed it, but the key's state no longer takes this result (e.g. a create for a
    /// key now `deleting`).
    StateMoved {
        state: String,
    },
    /// The key row is gone.
    Missing,
}

impl WriteOutcome {
    pub fn is_applied(&self) -> bool {
        matches!(self, Self::Applied)
    }
}

/// The statement of `KeyWrite::Created`.
const CREATED: usize = 0;

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

    /// Writes a batch of results in one call to `keyfleet_write_keys` (one round trip, one
    /// transaction; one multi-row statement per kind of result, see its migration). Returns, for
    /// each input in order, whether it was applied and if not, why (see [`WriteOutcome`]).
    ///
    /// Creates that claim the same server id run in rounds, oldest fence first, so the newest
    /// claim ends up with the id and the older keys are displaced (a row whose id a server handed
    /// out again goes back to pending): each of those creates is `Applied`, then superseded.
    pub async fn write_keys(&self, batch: &[KeyWrite]) -> Result<Vec<WriteOutcome>> {
        let rounds = create_rounds(batch);
        let mut columns = BatchColumns::default();
        for (write, round) in batch.iter().zip(rounds) {
            columns.push(write, round);
        }
        let missed = sqlx::query(
            "SELECT idx, row_fence, row_state
             FROM keyfleet_write_keys($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&columns.statements)
        .bind(&columns.rounds)
        .bind(&columns.subscriptions)
        .bind(&columns.servers)
        .bind(&columns.fences)
        .bind(&columns.a)
        .bind(&columns.b)
        .bind(&columns.n)
        .fetch_all(&self.pool)
        .await?;
        let mut outcomes = vec![WriteOutcome::Applied; batch.len()];
        for row in missed {
            let idx = row.try_get::<i32, _>("idx")?;
            let idx = usize::try_from(idx)
                .ok()
                .filter(|&i| i < batch.len())
                .ok_or_else(|| {
                    Error::Db(sqlx::Error::Decode(
                        format!(
                            "keyfleet_write_keys returned result {idx} of {}",
                            batch.len()
                        )
                        .into(),
                    ))
                })?;
            let fence: Option<i64> = row.try_get("row_fence")?;
            outcomes[idx] = match (fence, row.try_get::<Option<String>, _>("row_state")?) {
                (Some(row_fence), _) if row_fence > batch[idx].fence() => {
                    WriteOutcome::Fenced { row_fence }
                }
                (Some(_), Some(state)) => WriteOutcome::StateMoved { state },
                _ => WriteOutcome::Missing,
            };
        }
        Ok(outcomes)
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

    /// Active keys per server id (servers without any are absent). Reads only the partial index
    /// of active keys, however many deleted rows the table holds.
    pub async fn active_keys_per_server(&self) -> Result<HashMap<ServerId, i64>> {
        let rows: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT server_id, count(*) FROM keys WHERE state = 'active' GROUP BY server_id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(s, n)| (ServerId(s), n)).collect())
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

/// The arguments of `keyfleet_write_keys` (see its migration): one element per result.
#[derive(Default)]
struct BatchColumns {
    statements: Vec<i32>,
    rounds: Vec<i32>,
    subscriptions: Vec<String>,
    servers: Vec<i64>,
    fences: Vec<i64>,
    a: Vec<String>,
    b: Vec<String>,
    n: Vec<i64>,
}

impl BatchColumns {
    fn push(&mut self, write: &KeyWrite, round: usize) {
        let (sub, server) = write.key();
        let (statement, a, b, n) = write.columns();
        self.statements.push(statement as i32);
        self.rounds.push(round as i32);
        self.subscriptions.push(sub.as_str().to_owned());
        self.servers.push(server.0);
        self.fences.push(write.fence());
        self.a.push(a.to_owned());
        self.b.push(b.to_owned());
        self.n.push(n);
    }
}

/// For each write, the round of its statement: 0, except for a create that claims a server id an
/// older create (lower fence) in the batch also claims, which runs after it.
fn create_rounds(batch: &[KeyWrite]) -> Vec<usize> {
    let mut rounds = vec![0; batch.len()];
    let mut creates: Vec<(i64, usize, i64, &str)> = batch
        .iter()
        .enumerate()
        .filter_map(|(i, w)| match w {
            KeyWrite::Created {
                server,
                fence,
                server_key_id,
                ..
            } => Some((*fence, i, server.0, server_key_id.as_str())),
            _ => None,
        })
        .collect();
    creates.sort_unstable();
    let mut claims: HashMap<(i64, &str), usize> = HashMap::new();
    for (_, i, server, id) in creates {
        let claimed = claims.entry((server, id)).or_insert(0);
        rounds[i] = *claimed;
        *claimed += 1;
    }
    rounds
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
            "UPDATE keys k SET state = 'pending', failed_transiently = false, updated_at = now()
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

impl Store {
    /// The keys of a server that failed on errors that may pass (their attempts ran out on transient
    /// errors) and whose subscription is still active and not past its expiry.
    pub async fn retryable_failed_keys(&self, server: ServerId) -> Result<Vec<SubscriptionId>> {
        let rows = sqlx::query(&format!(
            "SELECT k.subscription_id FROM keys k JOIN subscriptions s ON s.id = k.subscription_id
             WHERE {RETRYABLE_FAILED} ORDER BY k.subscription_id"
        ))
        .bind(server.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(subscription_of).collect()
    }

    /// Puts exactly the keys [`Store::retryable_failed_keys`] lists back to `pending`, in one
    /// statement, and returns them (sorted); their last error stays visible.
    pub async fn requeue_failed_keys(&self, server: ServerId) -> Result<Vec<SubscriptionId>> {
        let rows = sqlx::query(&format!(
            "UPDATE keys k SET state = 'pending', failed_transiently = false, updated_at = now()
             FROM subscriptions s WHERE s.id = k.subscription_id AND {RETRYABLE_FAILED}
             RETURNING k.subscription_id"
        ))
        .bind(server.0)
        .fetch_all(&self.pool)
        .await?;
        let mut subs: Vec<SubscriptionId> =
            rows.iter().map(subscription_of).collect::<Result<_>>()?;
        subs.sort();
        Ok(subs)
    }
}

/// Keys of server $1 (joined with their subscription `s`) whose last failure was transient.
const RETRYABLE_FAILED: &str = "k.server_id = $1 AND k.state = 'failed' AND k.failed_transiently
     AND s.status = 'active' AND (s.expires_at IS NULL OR s.expires_at > now())";

fn subscription_of(row: &sqlx::postgres::PgRow) -> Result<SubscriptionId> {
    let raw: String = row.try_get(0)?;
    SubscriptionId::parse(&raw).map_err(|e| Error::Rejected(format!("keys.subscription_id: {e}")))
}
