use keyfleet_core::{ServerId, ServerKind};
use serde::Serialize;
use sqlx::Row;

use crate::{Error, Result, Store, constraint_error};

/// A server to register. Values are validated by the caller and again by the schema's checks.
#[derive(Debug, Clone)]
pub struct NewServer {
    pub name: String,
    pub kind: ServerKind,
    pub api_url: String,
    pub api_key: Option<String>,
    pub cert_sha256: Option<String>,
    pub max_in_flight: i32,
    /// xray-grpc: the node's settings (`keyfleet_vpn::GrpcSettings` as JSON).
    pub grpc: Option<serde_json::Value>,
    /// xray-grpc: the secret its users' uuids are derived from.
    pub key_secret: Option<String>,
}

#[derive(Clone, Serialize)]
pub struct Server {
    pub id: ServerId,
    pub name: String,
    pub kind: ServerKind,
    #[serde(skip)]
    pub api_url: String,
    #[serde(skip)]
    pub api_key: Option<String>,
    pub cert_sha256: Option<String>,
    pub max_in_flight: i32,
    /// xray-grpc: inbound tag, API package, protocol and link parameters (no secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc: Option<serde_json::Value>,
    #[serde(skip)]
    pub key_secret: Option<String>,
    pub active: bool,
    pub config_generation: i64,
    /// Paused by an operator: no job of it is claimed until resumed.
    pub paused: bool,
    /// Grows with every change of the row: workers rebuild the server's client when it moves.
    pub revision: i64,
}

/// A change to a server's settings; `None` leaves a field as it is. Validated by the caller and
/// again by the schema's checks.
#[derive(Debug, Clone, Default)]
pub struct ServerChange {
    pub max_in_flight: Option<i32>,
    pub active: Option<bool>,
    pub api_url: Option<String>,
    pub api_key: Option<String>,
    pub cert_sha256: Option<String>,
}

impl std::fmt::Debug for Server {
    // The API URL (Outline's secret prefix) and the API key are credentials: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("max_in_flight", &self.max_in_flight)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

const SERVER_COLUMNS: &str = "id, name, kind, api_url, api_key, cert_sha256, max_in_flight, grpc, key_secret, active, config_generation, paused, revision";

fn server_from_row(row: &sqlx::postgres::PgRow) -> Result<Server> {
    let kind: String = row.try_get("kind")?;
    Ok(Server {
        id: ServerId(row.try_get("id")?),
        name: row.try_get("name")?,
        kind: kind
            .parse()
            .map_err(|e| Error::Rejected(format!("servers.kind: {e}")))?,
        api_url: row.try_get("api_url")?,
        api_key: row.try_get("api_key")?,
        cert_sha256: row.try_get("cert_sha256")?,
        max_in_flight: row.try_get("max_in_flight")?,
        grpc: row.try_get("grpc")?,
        key_secret: row.try_get("key_secret")?,
        active: row.try_get("active")?,
        config_generation: row.try_get("config_generation")?,
        paused: row.try_get("paused")?,
        revision: row.try_get("revision")?,
    })
}

impl Store {
    pub async fn add_server(&self, new: &NewServer) -> Result<Server> {
        let row = sqlx::query(&format!(
            "INSERT INTO servers (name, kind, api_url, api_key, cert_sha256, max_in_flight, grpc, key_secret)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {SERVER_COLUMNS}"
        ))
        .bind(&new.name)
        .bind(new.kind.as_str())
        .bind(&new.api_url)
        .bind(&new.api_key)
        .bind(&new.cert_sha256)
        .bind(new.max_in_flight)
        .bind(&new.grpc)
        .bind(&new.key_secret)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| constraint_error(e, &format!("server {:?}", new.name)))?;
        server_from_row(&row)
    }

    pub async fn list_servers(&self) -> Result<Vec<Server>> {
        let rows = sqlx::query(&format!("SELECT {SERVER_COLUMNS} FROM servers ORDER BY id"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(server_from_row).collect()
    }

    pub async fn server(&self, id: ServerId) -> Result<Option<Server>> {
        let row = sqlx::query(&format!(
            "SELECT {SERVER_COLUMNS} FROM servers WHERE id = $1"
        ))
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(server_from_row).transpose()
    }

    pub async fn server_by_name(&self, name: &str) -> Result<Server> {
        let row = sqlx::query(&format!(
            "SELECT {SERVER_COLUMNS} FROM servers WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => server_from_row(&row),
            None => Err(Error::NotFound(format!("no server named {name:?}"))),
        }
    }

    pub async fn set_server_limit(&self, name: &str, max_in_flight: i32) -> Result<Server> {
        let row = sqlx::query(&format!(
            "UPDATE servers SET max_in_flight = $2 WHERE name = $1 RETURNING {SERVER_COLUMNS}"
        ))
        .bind(name)
        .bind(max_in_flight)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| constraint_error(e, &format!("limit {max_in_flight} for server {name:?}")))?;
        match row {
            Some(row) => server_from_row(&row),
            None => Err(Error::NotFound(format!("no server named {name:?}"))),
        }
    }

    /// Applies a change in one statement, bumping the revision; `NotFound` for an unknown name.
    pub async fn update_server(&self, name: &str, change: &ServerChange) -> Result<Server> {
        let row = sqlx::query(&format!(
            "UPDATE servers SET
                 max_in_flight = COALESCE($2, max_in_flight),
                 active = COALESCE($3, active),
                 api_url = COALESCE($4, api_url),
                 api_key = COALESCE($5, api_key),
                 cert_sha256 = COALESCE($6, cert_sha256),
                 revision = revision + 1
             WHERE name = $1 RETURNING {SERVER_COLUMNS}"
        ))
        .bind(name)
        .bind(change.max_in_flight)
        .bind(change.active)
        .bind(&change.api_url)
        .bind(&change.api_key)
        .bind(&change.cert_sha256)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| constraint_error(e, &format!("the change to server {name:?}")))?;
        match row {
            Some(row) => server_from_row(&row),
            None => Err(Error::NotFound(format!("no server named {name:?}"))),
        }
    }

    /// Records an operator's pause or resume; `NotFound` for an unknown name.
    pub async fn set_server_paused(&self, name: &str, paused: bool) -> Result<Server> {
        let row = sqlx::query(&format!(
            "UPDATE servers SET paused = $2 WHERE name = $1 RETURNING {SERVER_COLUMNS}"
        ))
        .bind(name)
        .bind(paused)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => server_from_row(&row),
            None => Err(Error::NotFound(format!("no server named {name:?}"))),
        }
    }

    /// Every server's revision, for workers to notice changed settings.
    pub async fn server_revisions(&self) -> Result<Vec<(ServerId, i64)>> {
        let rows = sqlx::query("SELECT id, revision FROM servers")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((ServerId(r.try_get("id")?), r.try_get("revision")?)))
            .collect()
    }
}
