use chrono::{DateTime, Utc};
use keyfleet_core::{ServerId, SubscriptionId};
use sqlx::Row;

use crate::{Result, Store};

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
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO subscriptions (id, expires_at, status) VALUES ($1, $2, 'active')
             ON CONFLICT (id) DO UPDATE
             SET expires_at = EXCLUDED.expires_at, status = 'active', updated_at = now()",
        )
        .bind(sub.as_str())
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        let rows = sqlx::query(
            "INSERT INTO keys (subscription_id, server_id, state, enqueued_at)
             SELECT $1, id, 'pending', now() FROM servers WHERE active
             ON CONFLICT (subscription_id, server_id) DO UPDATE
             SET state = CASE WHEN keys.state = 'active' THEN 'active' ELSE 'pending' END,
                 enqueued_at = CASE WHEN keys.state = 'active' THEN keys.enqueued_at ELSE now() END,
                 updated_at = now()
             RETURNING server_id, state, (fence > 0 OR last_error IS NOT NULL) AS tried",
        )
        .bind(sub.as_str())
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
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
