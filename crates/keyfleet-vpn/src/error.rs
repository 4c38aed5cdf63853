use std::time::Duration;

use keyfleet_core::{Failure, FailureClass};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking to a VPN server.
///
/// `server` fields hold the redacted API URL (see [`crate::redact_url`]), `endpoint` fields the
/// method and path below it (`POST /api/users`): never an Outline secret prefix or an API key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid VPN server configuration: {reason}")]
    Config { reason: String },

    /// The request never reached the server: DNS, refused, reset or timed out while connecting.
    #[error("cannot connect to {server}: {detail}")]
    Connect { server: String, detail: String },

    /// The request was sent but no full response arrived within the request timeout: the server
    /// may have acted on it.
    #[error("{server}: {endpoint} timed out waiting for the response")]
    Timeout { server: String, endpoint: String },

    /// The connection broke after the request was sent: the server may have acted on it.
    #[error("{server}: the connection broke during {endpoint}: {detail}")]
    Interrupted {
        server: String,
        endpoint: String,
        detail: String,
    },

    #[error(
        "{server}: the TLS certificate does not match the pinned one (pinned SHA-256 {expected}, \
         server presented {actual}); the server was reinstalled or the connection is intercepted; \
         refusing to talk to it until cert_sha256 is checked and updated"
    )]
    CertificateMismatch {
        server: String,
        expected: String,
        actual: String,
    },

    /// The TLS handshake failed for a reason other than the pin (protocol error, bad signature,
    /// plain HTTP on an https URL). Resets and EOFs during the handshake are [`Error::Connect`].
    #[error("TLS handshake with {server} failed: {detail}")]
    Tls { server: String, detail: String },

    #[error("{server} rejected the credentials (401/403): check the server's API key")]
    Unauthorized { server: String },

    #[error("{server} is rate limiting requests (429){}", fmt_retry_after(*.retry_after))]
    RateLimited {
        server: String,
        retry_after: Option<Duration>,
    },

    #[error("{server}: {endpoint} failed with server error {status}: {body}")]
    ServerError {
        server: String,
        endpoint: String,
        status: u16,
        body: String,
    },

    #[error("{server}: conflict: {detail}")]
    Conflict { server: String, detail: String },

    #[error("{server}: not found: {what}")]
    NotFound { server: String, what: String },

    #[error("{server}: {endpoint} was refused with status {status}: {body}")]
    BadRequest {
        server: String,
        endpoint: String,
        status: u16,
        body: String,
    },

    #[error("{server}: cannot decode the response of {endpoint}: {detail}")]
    Decode {
        server: String,
        endpoint: String,
        detail: String,
    },

    /// A 2xx body longer than `ClientConfig::max_body_bytes`; it was cut off, not read.
    #[error(
        "{server}: the response of {endpoint} is larger than the {limit}-byte limit \
         (ClientConfig::max_body_bytes); not read further"
    )]
    BodyTooLarge {
        server: String,
        endpoint: String,
        limit: usize,
    },

    /// Text in a response that keyfleet will not store or act on (see `crate::text`): a control
    /// character or NUL byte, or over a size limit. `detail` says what and where, never the text.
    #[error("{server}: {endpoint}: {detail}")]
    InvalidText {
        server: String,
        endpoint: String,
        detail: String,
    },

    /// A gRPC node refused a call (any status not classified otherwise: unknown, invalid
    /// argument, unimplemented, ...). `message` is the node's, cut to a size and made printable.
    #[error("{server}: {endpoint} failed with gRPC status {code}: {message}")]
    Rpc {
        server: String,
        endpoint: String,
        code: String,
        message: String,
    },

    #[error(
        "{server}: key id {id:?} is taken by a key keyfleet did not create; \
         rename or delete that key on the server"
    )]
    ForeignKey { server: String, id: String },
}

fn fmt_retry_after(retry_after: Option<Duration>) -> String {
    match retry_after {
        Some(d) => format!(", retry after {} s", d.as_secs()),
        None => String::new(),
    }
}

impl Error {
    /// Whether retrying can help.
    ///
    /// Retryable: connect errors, timeouts, broken connections, 5xx, 429 (with its `Retry-After`).
    /// Permanent: bad configuration, certificate pin mismatch, other TLS handshake failures (a
    /// protocol-level TLS error means the server speaks something else or is not who it claims to
    /// be; resets during the handshake are `Connect`), 401/403, other 4xx, responses that do not
    /// decode or carry invalid text, a foreign key at our id, and a conflict or not-found nothing
    /// handled. A body over the size limit is permanent too: the server answers the same next
    /// time (a list does not shrink by itself) and each retry would download the limit again;
    /// an operator raises `max_body_bytes` or looks at the server.
    pub fn class(&self) -> FailureClass {
        match self {
            Self::Connect { .. }
            | Self::Timeout { .. }
            | Self::Interrupted { .. }
            | Self::ServerError { .. } => FailureClass::Retryable { retry_after: None },
            Self::RateLimited { retry_after, .. } => FailureClass::Retryable {
                retry_after: *retry_after,
            },
            Self::Config { .. }
            | Self::CertificateMismatch { .. }
            | Self::Tls { .. }
            | Self::Unauthorized { .. }
            | Self::Conflict { .. }
            | Self::NotFound { .. }
            | Self::BadRequest { .. }
            | Self::Decode { .. }
            | Self::BodyTooLarge { .. }
            | Self::InvalidText { .. }
            | Self::Rpc { .. }
            | Self::ForeignKey { .. } => FailureClass::Permanent,
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self.class(), FailureClass::Retryable { .. })
    }

    /// Whether the server may have acted on the request even though it failed (a lost response, a
    /// 500 after commit). A later attempt of the same create must then pass `is_retry = true`.
    /// `false` only where the request certainly had no effect.
    pub fn may_have_taken_effect(&self) -> bool {
        !matches!(
            self,
            Self::Config { .. }
                | Self::Connect { .. }
                | Self::CertificateMismatch { .. }
                | Self::Tls { .. }
                | Self::Unauthorized { .. }
                | Self::RateLimited { .. }
        )
    }

    pub fn to_failure(&self) -> Failure {
        Failure {
            class: self.class(),
            message: self.to_string(),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        e.to_failure()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s() -> String {
        "https://h:1/…".to_owned()
    }

    #[test]
    fn classes() {
        let retryable = [
            Error::Connect {
                server: s(),
                detail: "refused".into(),
            },
            Error::Timeout {
                server: s(),
                endpoint: "GET /server".into(),
            },
            Error::Interrupted {
                server: s(),
                endpoint: "GET /server".into(),
                detail: "reset".into(),
            },
            Error::ServerError {
                server: s(),
                endpoint: "POST /api/users".into(),
                status: 503,
                body: String::new(),
            },
        ];
        for e in retryable {
            assert_eq!(
                e.class(),
                FailureClass::Retryable { retry_after: None },
                "{e}"
            );
            assert!(e.to_failure().is_retryable());
        }
        let limited = Error::RateLimited {
            server: s(),
            retry_after: Some(Duration::from_secs(7)),
        };
        assert_eq!(
            limited.class(),
            FailureClass::Retryable {
                retry_after: Some(Duration::from_secs(7))
            }
        );
        assert!(limited.to_string().contains("retry after 7 s"), "{limited}");
        assert!(!limited.may_have_taken_effect());

        let permanent = [
            Error::Config { reason: "x".into() },
            Error::CertificateMismatch {
                server: s(),
                expected: "AA".into(),
                actual: "BB".into(),
            },
            Error::Tls {
                server: s(),
                detail: "bad".into(),
            },
            Error::Unauthorized { server: s() },
            Error::Conflict {
                server: s(),
                detail: "x".into(),
            },
            Error::NotFound {
                server: s(),
                what: "x".into(),
            },
            Error::BadRequest {
                server: s(),
                endpoint: "x".into(),
                status: 400,
                body: String::new(),
            },
            Error::Decode {
                server: s(),
                endpoint: "x".into(),
                detail: "x".into(),
            },
            Error::ForeignKey {
                server: s(),
                id: "kf-a".into(),
            },
            Error::BodyTooLarge {
                server: s(),
                endpoint: "GET /api/users".into(),
                limit: 10,
            },
            Error::InvalidText {
                server: s(),
                endpoint: "GET /access-keys".into(),
                detail: "x".into(),
            },
        ];
        for e in permanent {
            let f = e.to_failure();
            assert_eq!(f.class, FailureClass::Permanent, "{e}");
            assert_eq!(f.message, e.to_string());
        }
    }

    #[test]
    fn messages_say_what_and_where() {
        let e = Error::CertificateMismatch {
            server: s(),
            expected: "AA".into(),
            actual: "BB".into(),
        };
        let m = e.to_string();
        assert!(
            m.contains("https://h:1/…") && m.contains("AA") && m.contains("BB"),
            "{m}"
        );
        let e = Error::Timeout {
            server: s(),
            endpoint: "GET /api/users".into(),
        };
        assert!(e.to_string().contains("GET /api/users"));
        assert!(e.may_have_taken_effect());
        assert!(
            !Error::Connect {
                server: s(),
                detail: String::new()
            }
            .may_have_taken_effect()
        );
    }
}
