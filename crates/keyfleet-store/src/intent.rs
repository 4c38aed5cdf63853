//! What keeps "Postgres holds the intent" true when Redis forgets: fence epochs handed out from a
//! Postgres sequence, the intent check a delete makes under its fence before it touches a server,
//! and the outstanding work that can always be re-derived from Postgres.

use keyfleet_core::{ServerId, SubscriptionId};
use sqlx::Row;

use crate::{Result, Store, sweeps::server_and_subscription};

/// What a delete found when it re-checked, under its fence, that Postgres still wants the key gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteIntent {
    /// Delete it. `server_key_id`: the id Postgres knows for the key, if any. The row now carries
    /// the delete's fence, so no older attempt can write it afterwards.
    Proceed { server_key_id: Option<String> },
    /// The key is wanted again (renewed, provisioned again): leave it alone.
    Wanted,
    /// A newer attempt already wrote the row.
    Fenced { row_fence: i64 },
}

impl Store {
    /// The next fence epoch (see `migrations/*_fence_epochs.sql`).
    pub async fn next_fence_epoch(&self) -> Result<i64> {
        let row = sqlx::query("SELECT nextval('fence_epochs')")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Decides, under `fence`, whether a delete of this key may go ahead. `target`: the delete is
    /// for this one server key (reconcile removing an orphan or a duplicate); a wanted key's
    /// target is deleted only when Postgres holds another id for it, i.e. it is a second copy.
    pub async fn recheck_delete(
        &self,
        sub: &SubscriptionId,
        server: ServerId,
        fence: i64,
        target: Option<&str>,
    ) -> Result<DeleteIntent> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT state, fence, server_key_id FROM keys
             WHERE subscription_id = $1 AND server_id = $2 FOR UPDATE",
        )
        .bind(sub.as_str())
        .bind(server.0)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(DeleteIntent::Proceed {
                server_key_id: None,
            });
        };
        let state: String = row.try_get("state")?;
        let row_fence: i64 = row.try_get("fence")?;
        let known: Option<String> = row.try_get("server_key_id")?;
        if row_fence > fence {
            return Ok(DeleteIntent::Fenced { row_fence });
        }
        let intent = match state.as_str() {
            "deleting" | "deleted" => {
                sqlx::query(
                    "UPDATE keys SET fence = $3 WHERE subscription_id = $1 AND server_id = $2",
                )
                .bind(sub.as_str())
                .bind(server.0)
                .bind(fence)
                .execute(&mut *tx)
                .await?;
                DeleteIntent::Proceed {
                    server_key_id: known,
                }
            }
            "active" if target.is_some() && known.is_some() && known.as_deref() != target => {
                DeleteIntent::Proceed {
                    server_key_id: known,
                }
            }
            _ => DeleteIntent::Wanted,
        };
        tx.commit().await?;
        Ok(intent)
    }

    /// Whether Postgres wants this key to exist (pending, active or failed).
    pub async fn key_wanted(&self, sub: &SubscriptionId, server: ServerId) -> Result<bool> {
        let row = sqlx::query(
            "SELECT 1 FROM keys WHERE subscription_id = $1 AND server_id = $2
               AND state IN ('pending', 'active', 'failed')",
        )
        .bind(sub.as_str())
        .bind(server.0)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// Keys Postgres wants created that are not active: pending keys of active subscriptions on
    /// active servers, with whether an earlier try may have acted (so the create looks first).
    pub async fn outstanding_creates(&self) -> Result<Vec<(ServerId, SubscriptionId, bool)>> {
        let rows = sqlx::query(
            "SELECT k.server_id, k.subscription_id, (k.fence > 0 OR k.last_error IS NOT NULL) AS tried
             FROM keys k
             JOIN servers s ON s.id = k.server_id
             JOIN subscriptions sub ON sub.id = k.subscription_id
             WHERE k.state = 'pending' AND s.active AND sub.status = 'active'
             ORDER BY k.server_id, k.subscription_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let (server, sub) = server_and_subscription(r)?;
                Ok((server, sub, r.try_get("tried")?))
            })
            .collect()
    }
}
