//! What the sweeps read and record: deprovision and expiry (keys to delete), stale configs,
//! the per-server view reconcile diffs against, traffic totals, and once-per-tick claims.

use std::{collections::BTreeMap, time::Duration};

use chrono::{DateTime, Utc};
use keyfleet_core::{ServerId, SubscriptionId};
use sqlx::Row;

use crate::{Error, Result, Store};

/// A key as reconcile compares it with the server's list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub subscription: SubscriptionId,
    pub state: String,
    pub server_key_id: Option<String>,
    /// The key is `failed`, on errors that may pass (its attempts ran out on transient errors).
    pub failed_transiently: bool,
}

impl StoredKey {
    /// Whether keyfleet wants this key to exist on its server.
    pub fn wanted(&self) -> bool {
        matches!(self.state.as_str(), "pending" | "active" | "failed")
    }
}

/// What a sweep tick found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickFindings {
    /// Server name → jobs found to do there.
    pub jobs: BTreeMap<String, u64>,
    /// Of those, how many were new.
    pub enqueued: u64,
    pub cancelled: u64,
    pub duration_ms: u64,
}

/// A fired tick of a sweep; `findings` is `None` for ticks fired before they were recorded.
#[derive(Debug, Clone)]
pub struct SweepTick {
    pub sweep: String,
    pub tick_at: DateTime<Utc>,
    pub fired_by: String,
    pub fired_at: DateTime<Utc>,
    pub findings: Option<TickFindings>,
}

/// What recording a traffic reading did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrafficOutcome {
    /// Applied: this many keys updated.
    Applied(u64),
    /// A collection with a newer fence was already applied.
    Fenced { row_fence: i64 },
}

/// How a server reports traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrafficKind {
    /// Cumulative counters that reset to 0 when the server restarts (V2Ray/Xray).
    Cumulative,
    /// Cumulative counters of a node that says when it started (a gRPC node: now − uptime).
    /// A start later than the last reading's means the counters restarted at 0: every reading
    /// is then new traffic, even one above the last raw value (which [`Self::Cumulative`] would
    /// take for growth and undercount).
    CumulativeSince(DateTime<Utc>),
    /// A rolling-window figure that may go down (Outline's 30 days).
    RollingWindow,
}

fn sub_of(row: &sqlx::postgres::PgRow, column: &str) -> Result<SubscriptionId> {
    let raw: String = row.try_get(column)?;
    SubscriptionId::parse(&raw).map_err(|e| Error::Rejected(format!("keys.subscription_id: {e}")))
}

pub(crate) fn server_and_subscription(
    row: &sqlx::postgres::PgRow,
) -> Result<(ServerId, SubscriptionId)> {
    Ok((
        ServerId(row.try_get("server_id")?),
        sub_of(row, "subscription_id")?,
    ))
}

impl Store {
    /// Marks a subscription cancelled and its keys as to be deleted; returns the servers whose key
    /// needs a delete job. `NotFound` for an unknown subscription.
    pub async fn record_deprovision(&self, sub: &SubscriptionId) -> Result<Vec<ServerId>> {
        let mut tx = self.pool.begin().await?;
        let found = sqlx::query(
            "UPDATE subscriptions SET status = 'cancelled', updated_at = now() WHERE id = $1",
        )
        .bind(sub.as_str())
        .execute(&mut *tx)
        .await?;
        if found.rows_affected() == 0 {
            return Err(Error::NotFound(format!("unknown subscription {sub:?}")));
        }
        let rows = sqlx::query(
            "UPDATE keys SET state = 'deleting', updated_at = now()
             WHERE subscription_id = $1 AND state <> 'deleted' RETURNING server_id",
        )
        .bind(sub.as_str())
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut servers: Vec<ServerId> = rows
            .iter()
            .map(|r| r.try_get(0).map(ServerId))
            .collect::<Result<_, _>>()?;
        servers.sort();
        Ok(servers)
    }

    /// Expires subscriptions past their expiry and returns every key waiting to be deleted
    /// (those just expired and any earlier ones whose delete has not completed), by server.
    pub async fn expire_due(
        &self,
        server: Option<ServerId>,
    ) -> Result<Vec<(ServerId, SubscriptionId)>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "WITH expired AS (
                 UPDATE subscriptions SET status = 'expired', updated_at = now()
                 WHERE status = 'active' AND expires_at <= now() RETURNING id)
             UPDATE keys SET state = 'deleting', updated_at = now()
             WHERE subscription_id IN (SELECT id FROM expired) AND state <> 'deleted'",
        )
        .execute(&mut *tx)
        .await?;
        let rows = sqlx::query(
            "SELECT server_id, subscription_id FROM keys
             WHERE state = 'deleting' AND ($1::bigint IS NULL OR server_id = $1)
             ORDER BY server_id, subscription_id",
        )
        .bind(server.map(|s| s.0))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.iter().map(server_and_subscription).collect()
    }

    /// Active keys whose link was never stored, is older than `ttl`, or predates their server's
    /// current config generation.
    pub async fn stale_configs(
        &self,
        ttl: Duration,
        server: Option<ServerId>,
    ) -> Result<Vec<(ServerId, SubscriptionId)>> {
        let rows = sqlx::query(
            "SELECT k.server_id, k.subscription_id FROM keys k JOIN servers s ON s.id = k.server_id
             WHERE k.state = 'active' AND s.active AND ($2::bigint IS NULL OR k.server_id = $2)
               AND (k.config_synced_at IS NULL
                    OR k.config_synced_at < now() - make_interval(secs => $1)
                    OR k.config_generation IS NULL OR k.config_generation < s.config_generation)
             ORDER BY k.server_id, k.subscription_id",
        )
        .bind(ttl.as_secs_f64())
        .bind(server.map(|s| s.0))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(server_and_subscription).collect()
    }

    /// Bumps a server's config generation (every link on it changed); returns the new generation.
    pub async fn bump_config_generation(&self, name: &str) -> Result<i64> {
        let row = sqlx::query(
            "UPDATE servers SET config_generation = config_generation + 1 WHERE name = $1 RETURNING config_generation",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(row.try_get(0)?),
            None => Err(Error::NotFound(format!("no server named {name:?}"))),
        }
    }

    pub async fn config_generation(&self, server: ServerId) -> Result<i64> {
        let row = sqlx::query("SELECT config_generation FROM servers WHERE id = $1")
            .bind(server.0)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => Ok(row.try_get(0)?),
            None => Err(Error::NotFound(format!("server {server} does not exist"))),
        }
    }

    /// Every key row of a server, for reconcile.
    pub async fn stored_keys(&self, server: ServerId) -> Result<Vec<StoredKey>> {
        let rows = sqlx::query(
            "SELECT subscription_id, state, server_key_id, state = 'failed' AND failed_transiently
             FROM keys WHERE server_id = $1",
        )
        .bind(server.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(StoredKey {
                    subscription: sub_of(r, "subscription_id")?,
                    state: r.try_get("state")?,
                    server_key_id: r.try_get("server_key_id")?,
                    failed_transiently: r.try_get(3)?,
                })
            })
            .collect()
    }

    /// The server key id Postgres knows for a key, if any.
    pub async fn server_key_id(
        &self,
        sub: &SubscriptionId,
        server: ServerId,
    ) -> Result<Option<String>> {
        let row = sqlx::query(
            "SELECT server_key_id FROM keys WHERE subscription_id = $1 AND server_id = $2",
        )
        .bind(sub.as_str())
        .bind(server.0)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(row) => row.try_get(0)?,
            None => None,
        })
    }

    /// Records one server's traffic readings in one statement; returns the keys updated, or the
    /// fence of the newer collection that was already applied. Cumulative counters: a reading
    /// below the last one means the counter reset, and the reading itself is the traffic since; a
    /// key missing from the readings has no counter (no traffic since the reset); totals never go
    /// down.
    pub async fn record_traffic(
        &self,
        server: ServerId,
        kind: TrafficKind,
        fence: i64,
        readings: &[(String, i64)],
    ) -> Result<TrafficOutcome> {
        let ids: Vec<&str> = readings.iter().map(|(id, _)| id.as_str()).collect();
        let bytes: Vec<i64> = readings.iter().map(|(_, b)| (*b).max(0)).collect();
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT traffic_fence, node_started_at FROM servers WHERE id = $1 FOR UPDATE",
        )
        .bind(server.0)
        .fetch_one(&mut *tx)
        .await?;
        let row_fence: i64 = row.try_get(0)?;
        let last_start: Option<DateTime<Utc>> = row.try_get(1)?;
        if row_fence >= fence {
            return Ok(TrafficOutcome::Fenced { row_fence });
        }
        // The start is now − uptime in whole seconds, read at another instant each time: under
        // two seconds apart is the same start (a node that restarts within two seconds of its
        // last start is taken for the same life).
        let restarted = match (kind, last_start) {
            (TrafficKind::CumulativeSince(started), Some(last)) => {
                started > last + chrono::Duration::seconds(2)
            }
            _ => false,
        };
        if let TrafficKind::CumulativeSince(started) = kind {
            sqlx::query("UPDATE servers SET node_started_at = $2 WHERE id = $1")
                .bind(server.0)
                .bind(started)
                .execute(&mut *tx)
                .await?;
        }
        let sql = match kind {
            TrafficKind::Cumulative | TrafficKind::CumulativeSince(_) if restarted => {
                "UPDATE keys k SET
                     traffic_bytes = k.traffic_bytes + u.raw,
                     traffic_last_raw = u.raw, traffic_updated_at = now()
                 FROM UNNEST($2::text[], $3::bigint[]) AS u(id, raw)
                 WHERE k.server_id = $1 AND k.server_key_id = u.id"
            }
            TrafficKind::Cumulative | TrafficKind::CumulativeSince(_) => {
                "UPDATE keys k SET
                     traffic_bytes = k.traffic_bytes + CASE
                         WHEN k.traffic_last_raw IS NULL OR u.raw < k.traffic_last_raw THEN u.raw
                         ELSE u.raw - k.traffic_last_raw END,
                     traffic_last_raw = u.raw, traffic_updated_at = now()
                 FROM UNNEST($2::text[], $3::bigint[]) AS u(id, raw)
                 WHERE k.server_id = $1 AND k.server_key_id = u.id"
            }
            TrafficKind::RollingWindow => {
                "UPDATE keys k SET traffic_window_bytes = u.raw, traffic_updated_at = now()
                 FROM UNNEST($2::text[], $3::bigint[]) AS u(id, raw)
                 WHERE k.server_id = $1 AND k.server_key_id = u.id"
            }
        };
        sqlx::query("UPDATE servers SET traffic_fence = $2 WHERE id = $1")
            .bind(server.0)
            .bind(fence)
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query(sql)
            .bind(server.0)
            .bind(&ids)
            .bind(&bytes)
            .execute(&mut *tx)
            .await?;
        // A key missing from the reading has counted 0: V2Ray lists a user only after its first
        // traffic since the counters (re)started, so its next reading counts from 0, not from its
        // reading before the reset; Outline leaves out keys with no bytes in its window.
        let missing = match kind {
            TrafficKind::Cumulative | TrafficKind::CumulativeSince(_) => {
                "traffic_last_raw = 0 WHERE k.traffic_last_raw > 0 AND"
            }
            TrafficKind::RollingWindow => {
                "traffic_window_bytes = 0 WHERE k.traffic_window_bytes > 0 AND"
            }
        };
        sqlx::query(&format!(
                "UPDATE keys k SET {missing} k.server_id = $1 AND k.server_key_id IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM UNNEST($2::text[]) AS u(id) WHERE u.id = k.server_key_id)"
            ))
            .bind(server.0)
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(TrafficOutcome::Applied(done.rows_affected()))
    }

    /// Claims a scheduled tick of a sweep for `by` inside `tx`; true for exactly one caller per
    /// (sweep, tick). The claim holds only if `tx` commits: commit it after the sweep ran, so a
    /// sweep that failed leaves its tick to be tried again.
    pub async fn claim_tick(
        &self,
        tx: &mut crate::Transaction,
        sweep: &str,
        tick_at: DateTime<Utc>,
        by: &str,
    ) -> Result<bool> {
        let row = sqlx::query(
            "INSERT INTO sweep_ticks (sweep, tick_at, fired_by) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING RETURNING 1",
        )
        .bind(sweep)
        .bind(tick_at)
        .bind(by)
        .fetch_optional(&mut **tx)
        .await?;
        Ok(row.is_some())
    }

    /// Records, inside the claiming `tx`, what the tick's sweep found (server name → jobs), how
    /// many of those jobs were new, how many it cancelled and how long it took.
    pub async fn record_tick(
        &self,
        tx: &mut crate::Transaction,
        sweep: &str,
        tick_at: DateTime<Utc>,
        findings: &TickFindings,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE sweep_ticks SET jobs = $3, enqueued = $4, cancelled = $5, duration_ms = $6
             WHERE sweep = $1 AND tick_at = $2",
        )
        .bind(sweep)
        .bind(tick_at)
        .bind(sqlx::types::Json(&findings.jobs))
        .bind(i32::try_from(findings.enqueued).unwrap_or(i32::MAX))
        .bind(i64::try_from(findings.cancelled).unwrap_or(i64::MAX))
        .bind(i32::try_from(findings.duration_ms).unwrap_or(i32::MAX))
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// The newest `per_sweep` ticks of every sweep, newest first within each sweep.
    pub async fn recent_ticks(&self, per_sweep: i64) -> Result<Vec<SweepTick>> {
        let rows = sqlx::query(
            "SELECT sweep, tick_at, fired_by, fired_at, jobs, enqueued, cancelled, duration_ms
             FROM (SELECT *, row_number() OVER (PARTITION BY sweep ORDER BY fired_at DESC) AS n
                   FROM sweep_ticks) t
             WHERE n <= $1 ORDER BY sweep, fired_at DESC",
        )
        .bind(per_sweep)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let jobs: Option<sqlx::types::Json<BTreeMap<String, u64>>> = row.try_get("jobs")?;
                let enqueued: Option<i32> = row.try_get("enqueued")?;
                let cancelled: Option<i64> = row.try_get("cancelled")?;
                let duration_ms: Option<i32> = row.try_get("duration_ms")?;
                Ok(SweepTick {
                    sweep: row.try_get("sweep")?,
                    tick_at: row.try_get("tick_at")?,
                    fired_by: row.try_get("fired_by")?,
                    fired_at: row.try_get("fired_at")?,
                    findings: match (jobs, enqueued, cancelled, duration_ms) {
                        (Some(jobs), Some(enqueued), Some(cancelled), Some(duration_ms)) => {
                            Some(TickFindings {
                                jobs: jobs.0,
                                enqueued: enqueued.max(0) as u64,
                                cancelled: cancelled.max(0) as u64,
                                duration_ms: duration_ms.max(0) as u64,
                            })
                        }
                        _ => None,
                    },
                })
            })
            .collect()
    }

    /// The latest tick of a sweep that fired, if any.
    pub async fn last_tick(&self, sweep: &str) -> Result<Option<DateTime<Utc>>> {
        let row = sqlx::query("SELECT max(tick_at) FROM sweep_ticks WHERE sweep = $1")
            .bind(sweep)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get(0)?)
    }

    /// How many ticks of a sweep fired (tests and `keyfleet scheduler` status).
    pub async fn tick_count(&self, sweep: &str) -> Result<i64> {
        let row = sqlx::query("SELECT count(*) FROM sweep_ticks WHERE sweep = $1")
            .bind(sweep)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Traffic of one key: (cumulative bytes, rolling-window bytes).
    pub async fn key_traffic(
        &self,
        sub: &SubscriptionId,
        server: ServerId,
    ) -> Result<Option<(i64, Option<i64>)>> {
        let row = sqlx::query(
            "SELECT traffic_bytes, traffic_window_bytes FROM keys WHERE subscription_id = $1 AND server_id = $2",
        )
        .bind(sub.as_str())
        .bind(server.0)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).transpose()
    }
}
