use std::collections::{BTreeMap, HashMap};

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

    /// Which statement writes it, and its variable columns (text a, text b, number n; for `Failed`,
    /// n is 1 when the failure was transient).
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

/// One statement per kind of result, each over `UNNEST` of the batch's column arrays
/// `u(idx, subscription_id, server_id, fence, a, b, n)`. The fence check is in every statement,
/// and each also checks the key is in a state the result may apply to (a create never resurrects a
/// key being deleted). A delete clears the key's server id: the key is gone, and a server may hand
/// the id out again (Outline < 1.8 after a wipe). Every write but `Failed` clears
/// `failed_transiently`.
const WRITE_STATEMENTS: [&str; 5] = [
    "SET state = 'active', server_key_id = u.a, link = u.b, config_synced_at = now(),
         config_generation = s.config_generation, last_error = NULL, failed_transiently = false,
         fence = u.fence, updated_at = now()
     FROM UNNEST_BATCH, servers s
     WHERE KEY_MATCHES AND s.id = u.server_id AND CREATE_APPLIES",
    "SET state = 'failed', last_error = u.a, failed_transiently = u.n <> 0, fence = u.fence,
         updated_at = now()
     FROM UNNEST_BATCH
     WHERE KEY_MATCHES AND k.state IN ('pending', 'failed')",
    "SET state = 'deleted', server_key_id = NULL, link = NULL, config_synced_at = NULL,
         deleted_at = now(), last_error = NULL, failed_transiently = false, fence = u.fence,
         updated_at = now()
     FROM UNNEST_BATCH
     WHERE KEY_MATCHES AND k.state IN ('deleting', 'deleted')",
    "SET link = u.a, config_synced_at = now(), config_generation = u.n, fence = u.fence, updated_at = now()
     FROM UNNEST_BATCH
     WHERE KEY_MATCHES AND k.state = 'active'",
    "SET state = 'pending', server_key_id = NULL, link = NULL, config_synced_at = NULL,
         last_error = 'missing on the server at reconcile', failed_transiently = false,
         fence = u.fence, updated_at = now()
     FROM UNNEST_BATCH
     WHERE KEY_MATCHES AND k.state = 'active'",
];

/// Run just before the creates, over the same arrays: a server that hands out an id again (Outline
/// < 1.8 after a wipe) has lost the key another live row of that server still records under it. A
/// create that applies takes the id from such a row if an older attempt wrote that row (its fence is
/// lower): the row goes back to `pending` with its id, link and sync time cleared, so reconcile
/// creates it again; a row being deleted stays `deleting` (its key is gone already, and its delete
/// must not remove the new key by that id).
const DISPLACE_REUSED_IDS: &str = "UPDATE keys d
     SET state = CASE WHEN d.state = 'deleting' THEN 'deleting' ELSE 'pending' END,
         server_key_id = NULL, link = NULL, config_synced_at = NULL, failed_transiently = false,
         last_error = CASE WHEN d.state = 'deleting'
             THEN 'the server reassigned this key''s id to another key: the key is gone'
             ELSE 'the server reassigned this key''s id to another key: to be created again' END,
         updated_at = now()
     FROM UNNEST_BATCH JOIN keys k ON k.subscription_id = u.subscription_id AND k.server_id = u.server_id
     WHERE k.fence <= u.fence AND CREATE_APPLIES
       AND d.server_id = u.server_id AND d.server_key_id = u.a AND d.subscription_id <> u.subscription_id
       AND d.state <> 'deleted' AND d.fence < u.fence";

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
    /// Returns, for each input in order, whether it was applied and if not, why (see
    /// [`WriteOutcome`]); the reasons come from one more statement over the results not applied.
    ///
    /// Creates that claim the same server id run in rounds, oldest fence first, so the newest
    /// claim ends up with the id and the older keys are displaced (see `DISPLACE_REUSED_IDS`): each
    /// of those creates is `Applied`, then superseded.
    pub async fn write_keys(&self, batch: &[KeyWrite]) -> Result<Vec<WriteOutcome>> {
        let rounds = create_rounds(batch);
        let mut groups: BTreeMap<(usize, usize), Unnested> = BTreeMap::new();
        for (i, write) in batch.iter().enumerate() {
            let statement = write.columns().0;
            groups
                .entry((statement, rounds[i]))
                .or_default()
                .push(i, write);
        }
        let mut applied = vec![false; batch.len()];
        let mut tx = self.pool.begin().await?;
        for (&(statement, _), g) in &groups {
            if statement == CREATED {
                g.bind(sqlx::query(&expand(DISPLACE_REUSED_IDS)))
                    .execute(&mut *tx)
                    .await?;
            }
            let sql = expand(&format!(
                "UPDATE keys k {} RETURNING u.idx",
                WRITE_STATEMENTS[statement]
            ));
            for row in g.bind(sqlx::query(&sql)).fetch_all(&mut *tx).await? {
                let idx: i32 = row.try_get(0)?;
                applied[idx as usize] = true;
            }
        }
        let mut outcomes = vec![WriteOutcome::Applied; batch.len()];
        let missed = Unnested::keys_of(batch, |i| !applied[i]);
        if !missed.index.is_empty() {
            let rows = sqlx::query(
                "SELECT u.idx, k.fence, k.state
                 FROM UNNEST($1::int[], $2::text[], $3::bigint[]) AS u(idx, subscription_id, server_id)
                 LEFT JOIN keys k ON k.subscription_id = u.subscription_id AND k.server_id = u.server_id",
            )
            .bind(&missed.index)
            .bind(&missed.subscriptions)
            .bind(&missed.servers)
            .fetch_all(&mut *tx)
            .await?;
            for row in rows {
                let idx = row.try_get::<i32, _>(0)? as usize;
                let fence: Option<i64> = row.try_get(1)?;
                outcomes[idx] = match (fence, row.try_get::<Option<String>, _>(2)?) {
                    (Some(row_fence), _) if row_fence > batch[idx].fence() => {
                        WriteOutcome::Fenced { row_fence }
                    }
                    (Some(_), Some(state)) => WriteOutcome::StateMoved { state },
                    _ => WriteOutcome::Missing,
                };
            }
        }
        tx.commit().await?;
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

impl Unnested {
    /// Adds `write`, the `idx`-th of its batch.
    fn push(&mut self, idx: usize, write: &KeyWrite) {
        let (sub, server) = write.key();
        let (_, a, b, n) = write.columns();
        self.index.push(idx as i32);
        self.subscriptions.push(sub.as_str().to_owned());
        self.servers.push(server.0);
        self.fences.push(write.fence());
        self.a.push(a.to_owned());
        self.b.push(b.to_owned());
        self.n.push(n);
    }

    /// The keys (index, subscription, server; no values) of the writes whose index `keep` selects.
    fn keys_of(batch: &[KeyWrite], keep: impl Fn(usize) -> bool) -> Self {
        let mut keys = Self::default();
        for (i, write) in batch.iter().enumerate().filter(|(i, _)| keep(*i)) {
            let (sub, server) = write.key();
            keys.index.push(i as i32);
            keys.subscriptions.push(sub.as_str().to_owned());
            keys.servers.push(server.0);
        }
        keys
    }

    /// Binds the arrays as $1..$7 of a statement made by [`expand`].
    fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(&self.index)
            .bind(&self.subscriptions)
            .bind(&self.servers)
            .bind(&self.fences)
            .bind(&self.a)
            .bind(&self.b)
            .bind(&self.n)
    }
}

/// Fills in the shared fragments of the write statements.
fn expand(statement: &str) -> String {
    statement
        .replace(
            "UNNEST_BATCH",
            "UNNEST($1::int[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::text[], $7::bigint[])
             AS u(idx, subscription_id, server_id, fence, a, b, n)",
        )
        .replace(
            "KEY_MATCHES",
            "k.subscription_id = u.subscription_id AND k.server_id = u.server_id AND k.fence <= u.fence",
        )
        .replace("CREATE_APPLIES", "k.state IN ('pending', 'active', 'failed')")
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
