//! What the purchase service calls: provision (returns the keys in one call when they are ready
//! within `wait_ms`), deprovision, and read a subscription.

use std::time::Duration;

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
};
use chrono::{DateTime, SecondsFormat, Utc};
use keyfleet_core::SubscriptionId;
use keyfleet_store::{StoredReceipt, SubscriptionKeys};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};

use super::{
    AppState,
    auth::{Caller, Role},
    error::{ApiError, ApiResult, Body, ErrorBody, Params},
};

/// The longest a call may wait for the keys.
pub const MAX_WAIT_MS: u64 = 30_000;

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProvisionRequest {
    /// When the subscription expires (RFC 3339); its keys are deleted then. Absent: never.
    #[schema(value_type = Option<String>, format = DateTime, example = "2027-01-31T00:00:00Z")]
    pub expires_at: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitParams {
    /// How long to wait for every key to be ready, 0-30000 ms (default 0: answer at once).
    #[param(minimum = 0, maximum = 30000)]
    pub wait_ms: Option<u64>,
}

/// A subscription and its key on every server.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionView {
    pub subscription: String,
    /// active, expired or cancelled.
    pub status: String,
    pub expires_at: Option<DateTime<Utc>>,
    /// For provision: every active server's key is active and committed. For deprovision: every
    /// key is deleted. For a read: the subscription is active and every key is.
    pub complete: bool,
    pub keys: Vec<KeyView>,
    /// The accepted request (provision only); a repeat with the same Idempotency-Key returns the
    /// same receipt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receipt: Option<Receipt>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyView {
    pub server: String,
    /// v2ray or outline.
    pub kind: String,
    /// pending, active, deleting, deleted or failed.
    pub state: String,
    /// The client link (vless://, ss://); present once the key is active.
    pub link: Option<String>,
    pub config_synced_at: Option<DateTime<Utc>>,
    /// Why the last attempt failed, if it did.
    pub last_error: Option<String>,
    pub traffic_bytes: i64,
    /// False if the server was deactivated (its key does not count towards `complete`).
    pub server_active: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Receipt {
    pub id: uuid::Uuid,
    pub accepted_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Create jobs enqueued by this call (0 on a renewal of keys that exist).
    pub jobs_enqueued: usize,
    /// Servers whose key already existed.
    pub already_active: usize,
}

fn view(keys: SubscriptionKeys, complete: bool, receipt: Option<Receipt>) -> SubscriptionView {
    SubscriptionView {
        subscription: keys.subscription.to_string(),
        status: keys.status,
        expires_at: keys.expires_at,
        complete,
        keys: keys
            .keys
            .into_iter()
            .map(|k| KeyView {
                server: k.server,
                kind: k.kind,
                state: k.state,
                link: k.link,
                config_synced_at: k.config_synced_at,
                last_error: k.last_error,
                traffic_bytes: k.traffic_bytes,
                server_active: k.server_active,
            })
            .collect(),
        receipt,
    }
}

fn subscription_id(raw: &str) -> ApiResult<SubscriptionId> {
    SubscriptionId::parse(raw).map_err(|e| ApiError::field("id", e.to_string()))
}

fn wait_of(params: &WaitParams) -> ApiResult<Duration> {
    match params.wait_ms.unwrap_or(0) {
        ms if ms <= MAX_WAIT_MS => Ok(Duration::from_millis(ms)),
        ms => Err(ApiError::field(
            "wait_ms",
            format!("{ms} is out of range: use 0..={MAX_WAIT_MS}"),
        )),
    }
}

fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(raw) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = raw
        .to_str()
        .ok()
        .filter(|k| (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::field(
                "Idempotency-Key",
                "use 1-255 visible ASCII characters (e.g. the order id)",
            )
        })?;
    Ok(Some(key.to_owned()))
}

fn parse_expiry(raw: Option<&str>) -> ApiResult<Option<DateTime<Utc>>> {
    let Some(raw) = raw else { return Ok(None) };
    let at = DateTime::parse_from_rfc3339(raw)
        .map_err(|e| {
            ApiError::field(
                "expires_at",
                format!("{raw:?} is not an RFC 3339 time ({e}); e.g. 2027-01-31T00:00:00Z"),
            )
        })?
        .with_timezone(&Utc);
    if at <= Utc::now() {
        return Err(ApiError::field(
            "expires_at",
            format!(
                "{} is in the past",
                at.to_rfc3339_opts(SecondsFormat::Secs, true)
            ),
        ));
    }
    Ok(Some(at))
}

/// A producer may act on subscriptions it provisioned (or that nobody owns yet); operators on all.
fn may_access(caller: &Caller, keys: &SubscriptionKeys) -> ApiResult<()> {
    match caller.role {
        Role::Admin | Role::Viewer => Ok(()),
        Role::Producer if keys.owner.as_deref() == Some(caller.name.as_str()) => Ok(()),
        Role::Producer => Err(ApiError::forbidden(format!(
            "subscription {:?} belongs to another producer",
            keys.subscription.as_str()
        ))),
    }
}

fn answer(view: SubscriptionView) -> (StatusCode, Json<SubscriptionView>) {
    let status = if view.complete {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    (status, Json(view))
}

/// Create or renew a subscription: one key per active server.
///
/// Answers 200 with every key's link once all are active and committed in Postgres within
/// `wait_ms`, else 202 with the keys as they are (poll `GET /v1/subscriptions/{id}` or call
/// again with the same Idempotency-Key). A repeat with the same Idempotency-Key returns the same
/// receipt and enqueues nothing; the same key with a different request is a 409.
#[utoipa::path(
    post,
    path = "/v1/subscriptions/{id}/provision",
    tag = "subscriptions",
    params(
        ("id" = String, Path, description = "Subscription id: 1-64 letters, digits, '-' or '_' (case-insensitive)", pattern = "^[A-Za-z0-9_-]{1,64}$", example = "order-4711"),
        ("Idempotency-Key" = Option<String>, Header, description = "e.g. the order id; 1-255 visible ASCII characters"),
        WaitParams,
    ),
    request_body(content = Option<ProvisionRequest>, content_type = "application/json"),
    responses(
        (status = 200, description = "Every key is active", body = SubscriptionView),
        (status = 202, description = "Accepted; not every key is active yet", body = SubscriptionView),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "No or bad token", body = ErrorBody),
        (status = 403, description = "Wrong role, or another producer's subscription", body = ErrorBody),
        (status = 409, description = "Idempotency-Key reused with another request", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body not JSON", body = ErrorBody),
        (status = 422, description = "A field is invalid", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Postgres or Redis unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn provision(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Params(params): Params<WaitParams>,
    headers: HeaderMap,
    Body(request): Body<ProvisionRequest>,
) -> ApiResult<(StatusCode, Json<SubscriptionView>)> {
    caller.allow(&[Role::Producer, Role::Admin])?;
    let sub = subscription_id(&id)?;
    let wait = wait_of(&params)?;
    let key = idempotency_key(&headers)?;
    let expires_at = parse_expiry(request.expires_at.as_deref())?;
    let fingerprint = request_fingerprint(&sub, expires_at);
    let producer = (caller.role == Role::Producer).then_some(caller.name.as_str());
    let ttl = state.receipt_ttl;

    let earlier = match &key {
        Some(key) => {
            state
                .store
                .provision_receipt(&caller.name, key, ttl)
                .await?
        }
        None => None,
    };
    let receipt = match earlier {
        Some(stored) => accept_repeat(&sub, &fingerprint, stored)?,
        None => {
            let accepted = state
                .producer
                .provision_by(&sub, expires_at, producer)
                .await?;
            let receipt = Receipt {
                id: uuid::Uuid::new_v4(),
                accepted_at: Utc::now(),
                expires_at,
                idempotency_key: key.clone(),
                jobs_enqueued: accepted.jobs.iter().filter(|j| j.new).count(),
                already_active: accepted.already_active.len(),
            };
            match &key {
                // A concurrent request with the same key may have stored its receipt first:
                // both provisioned (idempotent), both answer with the receipt that was kept.
                Some(key) => {
                    let stored = StoredReceipt {
                        request_sha256: fingerprint.clone(),
                        subscription: sub.to_string(),
                        receipt: serde_json::to_value(&receipt).map_err(anyhow::Error::from)?,
                    };
                    let kept = state
                        .store
                        .store_provision_receipt(&caller.name, key, ttl, &stored)
                        .await?;
                    accept_repeat(&sub, &fingerprint, kept)?
                }
                None => receipt,
            }
        }
    };
    let keys = wait_for(&state, &sub, wait, SubscriptionKeys::settled).await?;
    may_access(&caller, &keys)?;
    let complete = keys.complete();
    Ok(answer(view(keys, complete, Some(receipt))))
}

/// The subscription's keys once `done` holds of them, or as they are after `wait`.
async fn wait_for(
    state: &AppState,
    sub: &SubscriptionId,
    wait: Duration,
    done: impl Fn(&SubscriptionKeys) -> bool,
) -> ApiResult<SubscriptionKeys> {
    let read = || async { Ok(state.store.subscription_keys(sub).await?) };
    Ok(state.watch.wait_until(sub, wait, read, done).await?)
}

fn request_fingerprint(sub: &SubscriptionId, expires_at: Option<DateTime<Utc>>) -> Vec<u8> {
    let expires = expires_at
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true))
        .unwrap_or_default();
    Sha256::digest(format!("provision\n{sub}\n{expires}").as_bytes()).to_vec()
}

fn accept_repeat(
    sub: &SubscriptionId,
    fingerprint: &[u8],
    stored: StoredReceipt,
) -> ApiResult<Receipt> {
    if stored.request_sha256 != fingerprint || stored.subscription != sub.as_str() {
        return Err(ApiError::conflict(
            "this Idempotency-Key was used with a different request (subscription or expires_at)",
        ));
    }
    serde_json::from_value(stored.receipt)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("a stored receipt does not parse: {e}")))
}

/// Cancel a subscription: its key is deleted on every server.
///
/// Answers 200 once every key is deleted within `wait_ms`, else 202.
#[utoipa::path(
    post,
    path = "/v1/subscriptions/{id}/deprovision",
    tag = "subscriptions",
    params(
        ("id" = String, Path, description = "Subscription id", pattern = "^[A-Za-z0-9_-]{1,64}$", example = "order-4711"),
        WaitParams,
    ),
    responses(
        (status = 200, description = "Every key is deleted", body = SubscriptionView),
        (status = 202, description = "Accepted; deletes are under way", body = SubscriptionView),
        (status = 401, description = "No or bad token", body = ErrorBody),
        (status = 403, description = "Wrong role, or another producer's subscription", body = ErrorBody),
        (status = 404, description = "Unknown subscription", body = ErrorBody),
        (status = 422, description = "A parameter is invalid", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Postgres or Redis unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn deprovision(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Params(params): Params<WaitParams>,
) -> ApiResult<(StatusCode, Json<SubscriptionView>)> {
    caller.allow(&[Role::Producer, Role::Admin])?;
    let sub = subscription_id(&id)?;
    let wait = wait_of(&params)?;
    may_access(&caller, &state.store.subscription_keys(&sub).await?)?;
    state.producer.deprovision(&sub).await?;
    let all_deleted = |keys: &SubscriptionKeys| keys.keys.iter().all(|k| k.state == "deleted");
    let keys = wait_for(&state, &sub, wait, all_deleted).await?;
    let complete = all_deleted(&keys);
    Ok(answer(view(keys, complete, None)))
}

/// A subscription and its key on every server, links included.
#[utoipa::path(
    get,
    path = "/v1/subscriptions/{id}",
    tag = "subscriptions",
    params(("id" = String, Path, description = "Subscription id", pattern = "^[A-Za-z0-9_-]{1,64}$", example = "order-4711")),
    responses(
        (status = 200, description = "The subscription", body = SubscriptionView),
        (status = 401, description = "No or bad token", body = ErrorBody),
        (status = 403, description = "Another producer's subscription", body = ErrorBody),
        (status = 404, description = "Unknown subscription", body = ErrorBody),
        (status = 422, description = "A parameter is invalid", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Postgres unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<SubscriptionView>> {
    let sub = subscription_id(&id)?;
    let keys = state.store.subscription_keys(&sub).await?;
    may_access(&caller, &keys)?;
    let complete = keys.complete();
    Ok(Json(view(keys, complete, None)))
}
