//! Operators' view of the fleet: register servers, change their settings at run time (running
//! workers pick changes up without a restart), pause and resume claims, bump the config
//! generation.

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use keyfleet_core::ServerKind;
use keyfleet_store::{Server, ServerChange};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{
    AppState,
    auth::Caller,
    error::{ApiError, ApiResult, Body, BodyRejected, ErrorBody, Guarded},
};
use crate::servers::{
    GrpcInput, InvalidServer, validate_api_key, validate_api_url, validate_cert_sha256,
    validate_limit, validate_new_server,
};

/// A server as the API shows it: no credentials (the API key, Outline's secret URL prefix).
#[derive(Debug, Serialize, ToSchema)]
pub struct ServerView {
    pub id: i64,
    pub name: String,
    /// v2ray, outline or xray-grpc.
    pub kind: String,
    /// Scheme, host and port of the API URL (the path, which holds Outline's secret, is left out).
    pub api_origin: String,
    pub cert_sha256: Option<String>,
    /// xray-grpc: inbound tag, API package, protocol and link parameters.
    #[schema(value_type = Option<Object>)]
    pub grpc: Option<serde_json::Value>,
    pub max_in_flight: i32,
    pub active: bool,
    pub paused: bool,
    pub config_generation: i64,
    pub revision: i64,
}

impl From<Server> for ServerView {
    fn from(s: Server) -> Self {
        let api_origin = url::Url::parse(&s.api_url)
            .map(|u| u.origin().ascii_serialization())
            .unwrap_or_default();
        Self {
            id: s.id.0,
            name: s.name,
            kind: s.kind.as_str().into(),
            api_origin,
            cert_sha256: s.cert_sha256,
            grpc: s.grpc,
            max_in_flight: s.max_in_flight,
            active: s.active,
            paused: s.paused,
            config_generation: s.config_generation,
            revision: s.revision,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewServerRequest {
    /// 1-63 letters, digits, '.', '_' or '-'.
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", example = "de-1")]
    pub name: String,
    #[schema(value_type = ServerKindName)]
    pub kind: String,
    /// The panel URL (v2ray), or the apiUrl with its secret prefix (outline, https only).
    pub api_url: String,
    /// X-API-Key of a v2ray panel.
    pub api_key: Option<String>,
    /// certSha256 of an outline server (64 hex digits).
    pub cert_sha256: Option<String>,
    /// Requests the whole fleet of workers may have in flight to it (1-1000, default 4).
    #[schema(minimum = 1, maximum = 1000)]
    pub max_in_flight: Option<u32>,
    /// xray-grpc (required there, refused elsewhere): the inbound, the API package and the link
    /// parameters. The api_url is the node's API inbound, `http://HOST:PORT`.
    pub grpc: Option<GrpcInput>,
}

/// The kinds of server keyfleet drives.
#[derive(ToSchema)]
#[schema(rename_all = "kebab-case")]
#[allow(dead_code)] // documents the accepted values; parsed by `ServerKind`
pub enum ServerKindName {
    V2ray,
    Outline,
    XrayGrpc,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerPatch {
    #[schema(minimum = 1, maximum = 1000)]
    pub max_in_flight: Option<u32>,
    /// An inactive server gets no new keys (existing ones are kept and still deleted on expiry).
    pub active: Option<bool>,
    pub api_url: Option<String>,
    /// v2ray only.
    pub api_key: Option<String>,
    /// outline only.
    pub cert_sha256: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConfigBump {
    pub server: String,
    /// Links synced before this generation are re-fetched by the next config sweep.
    pub config_generation: i64,
}

fn field_error(e: InvalidServer) -> ApiError {
    ApiError::field(e.field, e.problem)
}

/// Every registered server.
#[utoipa::path(get, path = "/v1/servers", tag = "servers",
    responses(
        (status = 200, body = Vec<ServerView>),
        Guarded,
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<ServerView>>> {
    caller.operator()?;
    let servers = state.store.list_servers().await?;
    Ok(Json(servers.into_iter().map(ServerView::from).collect()))
}

/// Register a server; its limit holds fleet-wide at once.
#[utoipa::path(post, path = "/v1/servers", tag = "servers",
    request_body = NewServerRequest,
    responses(
        (status = 201, body = ServerView),
        (status = 409, description = "Name taken", body = ErrorBody),
        BodyRejected, Guarded,
    ),
    security(("bearer" = [])))]
pub async fn add(
    State(state): State<AppState>,
    caller: Caller,
    Body(request): Body<NewServerRequest>,
) -> ApiResult<(StatusCode, Json<ServerView>)> {
    caller.admin()?;
    let new = validate_new_server(
        &request.name,
        &request.kind,
        &request.api_url,
        request.api_key.as_deref(),
        request.cert_sha256.as_deref(),
        request.max_in_flight.unwrap_or(4),
        request.grpc.as_ref(),
    )
    .map_err(field_error)?;
    let server = state.store.add_server(&new).await?;
    state
        .queue
        .set_limits(&[(server.id, server.max_in_flight as u32)])
        .await?;
    Ok((StatusCode::CREATED, Json(server.into())))
}

/// Change a server's limit, activity, URL or credentials. Running workers use the new values for
/// their next job: the limit at the next claim, credentials within the refresh interval.
#[utoipa::path(patch, path = "/v1/servers/{name}", tag = "servers",
    params(("name" = String, Path, description = "Server name", pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", example = "de-1")),
    request_body = ServerPatch,
    responses(
        (status = 200, body = ServerView),
        (status = 404, body = ErrorBody),
        BodyRejected, Guarded,
    ),
    security(("bearer" = [])))]
pub async fn patch(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Body(patch): Body<ServerPatch>,
) -> ApiResult<Json<ServerView>> {
    caller.admin()?;
    let current = state.store.server_by_name(&name).await?;
    let change = validate_patch(current.kind, patch)?;
    let server = state.store.update_server(&name, &change).await?;
    if change.max_in_flight.is_some() {
        state
            .queue
            .set_limits(&[(server.id, server.max_in_flight as u32)])
            .await?;
    }
    Ok(Json(server.into()))
}

fn validate_patch(kind: ServerKind, patch: ServerPatch) -> ApiResult<ServerChange> {
    let ServerPatch {
        max_in_flight,
        active,
        api_url,
        api_key,
        cert_sha256,
    } = patch;
    if max_in_flight.is_none()
        && active.is_none()
        && api_url.is_none()
        && api_key.is_none()
        && cert_sha256.is_none()
    {
        return Err(ApiError::field(
            "body",
            "nothing to change: give max_in_flight, active, api_url, api_key or cert_sha256",
        ));
    }
    if api_key.is_some() && kind != ServerKind::V2ray {
        return Err(ApiError::field(
            "api_key",
            "only v2ray servers take an API key",
        ));
    }
    if cert_sha256.is_some() && kind != ServerKind::Outline {
        return Err(ApiError::field(
            "cert_sha256",
            "only outline servers take a certificate pin",
        ));
    }
    Ok(ServerChange {
        max_in_flight: max_in_flight
            .map(validate_limit)
            .transpose()
            .map_err(field_error)?
            .map(|n| n as i32),
        active,
        api_url: api_url
            .map(|u| validate_api_url(kind, &u))
            .transpose()
            .map_err(field_error)?,
        api_key: api_key
            .map(|k| validate_api_key(&k))
            .transpose()
            .map_err(field_error)?,
        cert_sha256: cert_sha256
            .map(|c| validate_cert_sha256(&c))
            .transpose()
            .map_err(field_error)?,
    })
}

/// Every link on the server changed (e.g. a Reality key rotation): the next config sweep
/// re-fetches exactly this server's links.
#[utoipa::path(post, path = "/v1/servers/{name}/bump-config", tag = "servers",
    params(("name" = String, Path, description = "Server name", pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", example = "de-1")),
    responses(
        (status = 200, body = ConfigBump),
        (status = 404, body = ErrorBody),
        Guarded,
    ),
    security(("bearer" = [])))]
pub async fn bump_config(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<ConfigBump>> {
    caller.admin()?;
    let config_generation = state.store.bump_config_generation(&name).await?;
    Ok(Json(ConfigBump {
        server: name,
        config_generation,
    }))
}

/// Stop claiming the server's jobs (running ones finish). Holds until resumed, across Redis
/// restarts (Postgres records it).
#[utoipa::path(post, path = "/v1/servers/{name}/pause", tag = "servers",
    params(("name" = String, Path, description = "Server name", pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", example = "de-1")),
    responses(
        (status = 200, body = ServerView),
        (status = 404, body = ErrorBody),
        Guarded,
    ),
    security(("bearer" = [])))]
pub async fn pause(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<ServerView>> {
    set_paused(&state, &caller, &name, true).await
}

/// Claim the server's jobs again.
#[utoipa::path(post, path = "/v1/servers/{name}/resume", tag = "servers",
    params(("name" = String, Path, description = "Server name", pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", example = "de-1")),
    responses(
        (status = 200, body = ServerView),
        (status = 404, body = ErrorBody),
        Guarded,
    ),
    security(("bearer" = [])))]
pub async fn resume(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<ServerView>> {
    set_paused(&state, &caller, &name, false).await
}

/// Postgres first (the intent; workers push it to Redis if this call cannot), then Redis.
async fn set_paused(
    state: &AppState,
    caller: &Caller,
    name: &str,
    paused: bool,
) -> ApiResult<Json<ServerView>> {
    caller.admin()?;
    let server = state.store.set_server_paused(name, paused).await?;
    if paused {
        state.queue.pause_server(server.id).await?;
    } else {
        state.queue.resume_server(server.id).await?;
    }
    Ok(Json(server.into()))
}
