//! Errors as the API answers them, and the extractors that turn malformed input into errors that
//! name the field. A 4xx says what and where; a 5xx is opaque, its detail goes to the log under
//! an id the response quotes.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
};
use serde::{Serialize, de::DeserializeOwned};
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable: invalid_json, invalid_field, unauthorized, forbidden, not_found,
    /// conflict, payload_too_large, rate_limited, unavailable, internal.
    pub code: String,
    /// The field (JSON path, query parameter, path parameter or header) that was wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub message: String,
}

#[derive(Debug)]
pub enum ApiError {
    Client {
        status: StatusCode,
        code: &'static str,
        field: Option<String>,
        message: String,
    },
    RateLimited {
        retry_after_secs: u64,
    },
    /// Postgres or Redis cannot be reached: 503, worth a retry.
    Unavailable(anyhow::Error),
    Internal(anyhow::Error),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Client {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_field",
            field: Some(field.into()),
            message: message.into(),
        }
    }

    pub fn status(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self::Client {
            status,
            code,
            field: None,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::status(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::status(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::status(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::status(StatusCode::CONFLICT, "conflict", message)
    }
}

impl From<keyfleet_store::Error> for ApiError {
    fn from(e: keyfleet_store::Error) -> Self {
        use keyfleet_store::Error as E;
        match e {
            E::NotFound(m) => Self::not_found(m),
            E::Forbidden(m) => Self::forbidden(m),
            E::Conflict(m) => Self::conflict(m),
            E::Rejected(m) => Self::status(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", m),
            e if e.is_transient() => Self::Unavailable(e.into()),
            e => Self::Internal(e.into()),
        }
    }
}

impl From<keyfleet_queue::Error> for ApiError {
    fn from(e: keyfleet_queue::Error) -> Self {
        Self::Unavailable(e.into())
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<keyfleet_store::Error>() {
            Ok(store) => store.into(),
            Err(e) => match e.downcast::<keyfleet_queue::Error>() {
                Ok(queue) => queue.into(),
                Err(e) => Self::Internal(e),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, detail, mut headers) = match self {
            Self::Client {
                status,
                code,
                field,
                message,
            } => {
                let mut headers = HeaderMap::new();
                if status == StatusCode::UNAUTHORIZED {
                    headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                }
                (
                    status,
                    ErrorDetail {
                        code: code.into(),
                        field,
                        message,
                    },
                    headers,
                )
            }
            Self::RateLimited { retry_after_secs } => {
                let mut headers = HeaderMap::new();
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    ErrorDetail {
                        code: "rate_limited".into(),
                        field: None,
                        message: format!(
                            "too many requests for this token; retry after {retry_after_secs} s"
                        ),
                    },
                    headers,
                )
            }
            Self::Unavailable(e) => {
                let id = uuid::Uuid::new_v4();
                tracing::warn!(error.id = %id, "a dependency is unavailable: {e:#}");
                let mut headers = HeaderMap::new();
                headers.insert(header::RETRY_AFTER, HeaderValue::from(1u64));
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorDetail {
                        code: "unavailable".into(),
                        field: None,
                        message: format!("Postgres or Redis is unavailable; retry (log id {id})"),
                    },
                    headers,
                )
            }
            Self::Internal(e) => {
                let id = uuid::Uuid::new_v4();
                tracing::error!(error.id = %id, "internal error: {e:#}");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorDetail {
                        code: "internal".into(),
                        field: None,
                        message: format!("internal error (log id {id})"),
                    },
                    HeaderMap::new(),
                )
            }
        };
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        (status, headers, axum::Json(ErrorBody { error: detail })).into_response()
    }
}

/// A JSON body whose errors name the field (`keys[0].name`), with the size limit and content
/// type checked. An empty body reads as `{}`.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                let mime = v.split(';').next().unwrap_or("").trim();
                mime.eq_ignore_ascii_case("application/json")
            });
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::status(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the body is larger than {} bytes", super::MAX_BODY_BYTES),
                )
            } else {
                ApiError::status(StatusCode::BAD_REQUEST, "invalid_json", e.body_text())
            }
        })?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            if json == Some(false) {
                return Err(ApiError::Client {
                    status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    code: "invalid_json",
                    field: Some("Content-Type".into()),
                    message: "the body must be application/json".into(),
                });
            }
            &bytes
        };
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        match serde_path_to_error::deserialize(de) {
            Ok(value) => Ok(Self(value)),
            Err(e) => {
                let path = e.path().to_string();
                let inner = e.into_inner();
                let (status, code) = if inner.is_data() {
                    (StatusCode::UNPROCESSABLE_ENTITY, "invalid_field")
                } else {
                    (StatusCode::BAD_REQUEST, "invalid_json")
                };
                Err(ApiError::Client {
                    status,
                    code,
                    field: (path != ".").then_some(path),
                    message: inner.to_string(),
                })
            }
        }
    }
}

/// Query parameters whose errors name the parameter.
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded::Deserializer::new(url::form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de).map(Self).map_err(|e| {
            let path = e.path().to_string();
            ApiError::field(
                if path == "." { "query".into() } else { path },
                e.into_inner().to_string(),
            )
        })
    }
}

/// What every endpoint behind a bearer token may answer besides its own responses (OpenAPI
/// only: `ApiError` produces them).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum Guarded {
    /// No token, a malformed one, or a revoked one.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The token's role may not do this.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// Over the token's rate limit: see Retry-After.
    #[response(status = 429)]
    RateLimited(ErrorBody),
    /// Postgres or Redis is unreachable: see Retry-After.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// What an endpoint that reads a JSON body may answer about it (OpenAPI only).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum BodyRejected {
    /// The body is not valid JSON.
    #[response(status = 400)]
    Malformed(ErrorBody),
    /// The body is over the size limit.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// The body is not `application/json`.
    #[response(status = 415)]
    NotJson(ErrorBody),
    /// A field is missing or wrong; `error.field` names it.
    #[response(status = 422)]
    InvalidField(ErrorBody),
}
