//! API bearer tokens, stored as SHA-256 digests: the token itself is shown once, at creation.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;

use crate::{Error, Result, Store, constraint_error};

/// A token as listed (never the token itself).
#[derive(Debug, Clone, Serialize)]
pub struct ApiToken {
    pub id: i64,
    pub name: String,
    pub role: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Who a presented token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenOwner {
    pub id: i64,
    pub name: String,
    pub role: String,
}

impl Store {
    pub async fn create_token(
        &self,
        name: &str,
        role: &str,
        sha256: &[u8; 32],
    ) -> Result<ApiToken> {
        let row = sqlx::query(
            "INSERT INTO api_tokens (name, role, token_sha256) VALUES ($1, $2, $3)
             RETURNING id, name, role, created_at, last_used_at, revoked_at",
        )
        .bind(name)
        .bind(role)
        .bind(&sha256[..])
        .fetch_one(&self.pool)
        .await
        .map_err(|e| constraint_error(e, &format!("token {name:?}")))?;
        token_from_row(&row)
    }

    pub async fn list_tokens(&self) -> Result<Vec<ApiToken>> {
        let rows = sqlx::query(
            "SELECT id, name, role, created_at, last_used_at, revoked_at FROM api_tokens ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(token_from_row).collect()
    }

    /// Revokes every live token with this name (or this id, when `name` is all digits); returns
    /// how many. `NotFound` when none was live.
    pub async fn revoke_token(&self, name_or_id: &str) -> Result<u64> {
        let id: Option<i64> = name_or_id.parse().ok();
        let done = sqlx::query(
            "UPDATE api_tokens SET revoked_at = now()
             WHERE revoked_at IS NULL AND (name = $1 OR id = $2)",
        )
        .bind(name_or_id)
        .bind(id)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(Error::NotFound(format!(
                "no live token named {name_or_id:?}"
            )));
        }
        Ok(done.rows_affected())
    }

    /// The live token with this digest, if any.
    pub async fn token_owner(&self, sha256: &[u8; 32]) -> Result<Option<TokenOwner>> {
        let row = sqlx::query(
            "SELECT id, name, role FROM api_tokens WHERE token_sha256 = $1 AND revoked_at IS NULL",
        )
        .bind(&sha256[..])
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(TokenOwner {
                id: row.try_get("id")?,
                name: row.try_get("name")?,
                role: row.try_get("role")?,
            })
        })
        .transpose()
    }

    pub async fn touch_token(&self, id: i64) -> Result<()> {
        sqlx::query("UPDATE api_tokens SET last_used_at = now() WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

fn token_from_row(row: &sqlx::postgres::PgRow) -> Result<ApiToken> {
    Ok(ApiToken {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        role: row.try_get("role")?,
        created_at: row.try_get("created_at")?,
        last_used_at: row.try_get("last_used_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}
