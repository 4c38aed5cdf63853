use chrono::{DateTime, Utc};
use keyfleet_core::{ServerId, SubscriptionId};
use serde::Serialize;
use sqlx::Row;

use crate::{Error, Result, Store};

/// What provisioning a subscription recorded: the servers whose key still has to be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionPlan {
    pub subscription: SubscriptionId,
    /// Active servers whose key for this subscription is not yet active: one create job each,
    /// with whether an earlier job already tried (so the create must look before it creates).
    pub to_create: Vec<(ServerId, bool)>,
    /// Active servers where the key already exists (a renewal).
    pub already_active: Vec<ServerId>,
}

impl Store {
    /// Records the desired state of a subscription in one transaction: the subscription (created or
    /// renewed) and one key row per active server. Keys that are not active are (re)set to pending.
    pub async fn record_provision(
        &self,
        sub: &SubscriptionId,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<ProvisionPlan> {
        self.record_provision_by(sub, expires_at, None).await
    }

    /// [`Store::record_provision`] on behalf of a producer: the subscription becomes the
    /// producer's if it has no owner yet, and one owned by another producer is refused
    /// (`Forbidden`) with nothing written.
    pub async fn record_provision_by(
        &self,
        sub: &SubscriptionId,
        expires_at: Option<DateTime<Utc>>,
        producer: Option<&str>,
    ) -> Result<ProvisionPlan> {
        // One statement (one round trip, its own transaction): a purchase waits for it. A
        // subscription another producer owns is neither updated nor given keys, and the statement
        // then returns only a row with `accepted` false.
        let rows = sqlx::query(
            "WITH sub AS (
                 INSERT INTO subscriptions (id, expires_at, status, owner)
                 VALUES ($1, $2, 'active', $3)
                 ON CONFLICT (id) DO UPDATE
                 SET expires_at = EXCLUDED.expires_at, status = 'active', updated_at = now(),
                     owner = COALESCE(subscriptions.owner, EXCLUDED.owner)
                 WHERE $3::text IS NULL OR subscriptions.owner IS NULL OR subscriptions.owner = $3
                 RETURNING id
             ), created AS (
                 INSERT INTO keys (subscription_id, server_id, state, enqueued_at)
                 SELECT sub.id, s.id, 'pending', now() FROM sub, servers s WHERE s.active
                 ON CONFLICT (subscription_id, server_id) DO UPDATE
                 SET state = CASE WHEN keys.state = 'active' THEN 'active' ELSE 'pending' END,
                     enqueued_at = CASE WHEN keys.state = 'active' THEN keys.enqueued_at ELSE now() END,
                     updated_at = now()
                 RETURNING server_id, state, (fence > 0 OR last_error IS NOT NULL) AS tried
             )
             SELECT true AS accepted, server_id, state, tried FROM created
             UNION ALL
             SELECT false, NULL, NULL, NULL WHERE NOT EXISTS (SELECT 1 FROM sub)",
        )
        .bind(sub.as_str())
        .bind(expires_at)
        .bind(producer)
        .fetch_all(&self.pool)
        .await?;
        if let Some(first) = rows.first()
            && !first.try_get::<bool, _>("accepted")?
        {
            return Err(Error::Forbidden(format!(
                "subscription {sub:?} belongs to another producer"
            )));
        }
        let mut plan = ProvisionPlan {
            subscription: sub.clone(),
            to_create: vec![],
            already_active: vec![],
        };
        for row in rows {
            let server = ServerId(row.try_get("server_id")?);
            let state: String = row.try_get("state")?;
            if state == "active" {
                plan.already_active.push(server);
            } else {
                plan.to_create.push((server, row.try_get("tried")?));
            }
        }
        plan.to_create.sort();
        plan.already_active.sort();
        Ok(plan)
    }

    pub async fn subscription_exists(&self, sub: &SubscriptionId) -> Result<bool> {
        let found = sqlx::query("SELECT 1 FROM subscriptions WHERE id = $1")
            .bind(sub.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(found.is_some())
    }
}

/// A subscription with every key's link, as the API returns it.
#[derive(Debug, Clone, Serialize)]
pub struct SubscriptionKeys {
    pub subscription: SubscriptionId,
    pub status: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub owner: Option<String>,
    pub keys: Vec<KeyDetail>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeyDetail {
    pub server: String,
    pub kind: String,
    /// False when the server was deactivated: its key no longer counts towards completeness.
    pub server_active: bool,
    pub state: String,
    pub link: Option<String>,
    pub config_synced_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub traffic_bytes: i64,
}

impl SubscriptionKeys {
    /// Every active server's key exists and its link is committed.
    pub fn complete(&self) -> bool {
        self.status == "active"
            && self
                .keys
                .iter()
                .filter(|k| k.server_active)
                .all(|k| k.state == "active")
    }

    /// Nothing more will change without someone acting: every active server's key is active or
    /// failed (dead-lettered), or the subscription is not active.
    pub fn settled(&self) -> bool {
        self.status != "active"
            || self
                .keys
                .iter()
                .filter(|k| k.server_active)
                .all(|k| k.state == "active" || k.state == "failed")
    }
}

/// A stored provision receipt.
#[derive(Debug, Clone)]
pub struct StoredReceipt {
    pub request_sha256: Vec<u8>,
    pub subscription: String,
    pub receipt: serde_json::Value,
}

impl Store {
    /// The subscription and its keys (links included); `NotFound` if unknown.
    pub async fn subscription_keys(&self, sub: &SubscriptionId) -> Result<SubscriptionKeys> {
        // One query, so the subscription and its keys come from one snapshot.
        let rows = sqlx::query(
            "SELECT sub.status, sub.expires_at, sub.owner, s.name, s.kind, s.active, k.state,
                    k.link, k.config_synced_at, k.last_error, k.traffic_bytes
             FROM subscriptions sub
                  LEFT JOIN (keys k JOIN servers s ON s.id = k.server_id)
                  ON k.subscription_id = sub.id
             WHERE sub.id = $1 ORDER BY s.id",
        )
        .bind(sub.as_str())
        .fetch_all(&self.pool)
        .await?;
        let head = rows
            .first()
            .ok_or_else(|| Error::NotFound(format!("unknown subscription {sub:?}")))?;
        let mut keys = Vec::with_capacity(rows.len());
        for row in &rows {
            // A subscription without keys is one row with no key in it.
            let Some(state) = row.try_get("state")? else {
                continue;
            };
            keys.push(KeyDetail {
                server: row.try_get("name")?,
                kind: row.try_get("kind")?,
                server_active: row.try_get("active")?,
                state,
                link: row.try_get("link")?,
                config_synced_at: row.try_get("config_synced_at")?,
                last_error: row.try_get("last_error")?,
                traffic_bytes: row.try_get("traffic_bytes")?,
            });
        }
        Ok(SubscriptionKeys {
            subscription: sub.clone(),
            status: head.try_get("status")?,
            expires_at: head.try_get("expires_at")?,
            owner: head.try_get("owner")?,
            keys,
        })
    }

    /// The receipt a producer got for this Idempotency-Key, if it is younger than `ttl`.
    pub async fn provision_receipt(
        &self,
        producer: &str,
        key: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<StoredReceipt>> {
        let row = sqlx::query(
            "SELECT request_sha256, subscription_id, receipt FROM provision_receipts
             WHERE producer = $1 AND idempotency_key = $2
               AND created_at > now() - make_interval(secs => $3)",
        )
        .bind(producer)
        .bind(key)
        .bind(ttl.as_secs_f64())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(StoredReceipt {
                request_sha256: row.try_get("request_sha256")?,
                subscription: row.try_get("subscription_id")?,
                receipt: row.try_get("receipt")?,
            })
        })
        .transpose()
    }

    /// Stores a receipt unless a live one holds the key; returns the one that holds it (this one,
    /// or the one a concurrent request stored first).
    pub async fn store_provision_receipt(
        &self,
        producer: &str,
        key: &str,
        ttl: std::time::Duration,
        receipt: &StoredReceipt,
    ) -> Result<StoredReceipt> {
        sqlx::query(
            "INSERT INTO provision_receipts
                 (producer, idempotency_key, request_sha256, subscription_id, receipt)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (producer, idempotency_key) DO UPDATE
             SET request_sha256 = EXCLUDED.request_sha256, subscription_id = EXCLUDED.subscription_id,
                 receipt = EXCLUDED.receipt, created_at = now()
             WHERE provision_receipts.created_at <= now() - make_interval(secs => $6)",
        )
        .bind(producer)
        .bind(key)
        .bind(&receipt.request_sha256)
        .bind(&receipt.subscription)
        .bind(&receipt.receipt)
        .bind(ttl.as_secs_f64())
        .execute(&self.pool)
        .await?;
        self.provision_receipt(producer, key, ttl)
            .await?
            .ok_or_else(|| Error::Conflict(format!("Idempotency-Key {key:?} expired meanwhile")))
    }

    /// Drops receipts older than `ttl`; returns how many.
    pub async fn prune_provision_receipts(&self, ttl: std::time::Duration) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM provision_receipts WHERE created_at <= now() - make_interval(secs => $1)",
        )
        .bind(ttl.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}
