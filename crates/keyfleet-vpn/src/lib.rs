//! Clients for the VPN server management APIs keyfleet drives: the V2Ray panel API
//! (`shared/specs/v2ray-panel-api.md`), the Outline server API (`shared/specs/outline-server-api.md`),
//! and the gRPC API of Xray-core and V2Ray nodes (`xray`).
//!
//! Invariants: one pooled HTTP client per server, built once and reused; creates are idempotent
//! by the deterministic names of `keyfleet_core` (a retried create adopts the key an earlier
//! attempt made instead of making a second one); every failure is classified retryable or
//! permanent; no message or log line contains an Outline secret prefix, an API key or a link.

mod de;
mod error;
mod http;
mod outline;
mod retry_after;
mod text;
mod tls;
mod v2ray;
mod xray;

use std::{fmt, time::Duration};

use keyfleet_core::{ServerKind, SubscriptionId};
use url::Url;

pub use error::{Error, Result};
pub use http::{REQUEST_DURATION_METRIC, redact_url};
pub use outline::{AccessKey, DataLimit, OutlineClient, ServerInfo, TransferMetrics};
pub use retry_after::{MAX_RETRY_AFTER, parse_retry_after};
pub use text::{MAX_ID_BYTES, MAX_LINK_BYTES, MAX_NAME_BYTES};
pub use tls::parse_cert_sha256;
pub use v2ray::{V2rayClient, V2rayLink, V2rayStats, V2rayUser, V2rayUserStats};
pub use xray::{
    AccountKind, GrpcApi, GrpcSettings, LinkParams, LinkSecurity, XrayClient, build_link,
};

/// Timeouts and pooling of the HTTP client of one server.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// TCP connect plus TLS handshake.
    pub connect_timeout: Duration,
    /// A whole request: connect, send, and read the full response.
    pub request_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// The largest 2xx response body read; a longer one is cut off and is
    /// [`Error::BodyTooLarge`]. The default, 64 MiB, holds a 100k-key list about three times
    /// over: ~180 bytes per V2Ray user and ~220 per Outline key (3,000 keys ≈ 0.66 MB) make 100k
    /// keys 18–22 MB, and panels add fields. The cap bounds the memory one request can take.
    pub max_body_bytes: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
            pool_max_idle_per_host: 64,
            max_body_bytes: 64 << 20,
        }
    }
}

/// Where a server's management API is and how to authenticate to it.
#[derive(Clone)]
pub struct ServerEndpoint {
    /// The server's name in keyfleet: the `server` label of the client's request metrics
    /// ([`REQUEST_DURATION_METRIC`]). Not a secret, unlike the URL.
    pub name: String,
    pub kind: ServerKind,
    /// V2Ray: the panel's base URL. Outline: `apiUrl`, whose path is the secret prefix.
    pub api_url: Url,
    /// V2Ray: the `X-API-Key` secret.
    pub api_key: Option<String>,
    /// Outline (required): the pinned leaf certificate's SHA-256, hex, case-insensitive, colons
    /// allowed. V2Ray (optional): pins a self-signed panel certificate the same way.
    pub cert_sha256: Option<String>,
    /// xray-grpc (required): the inbound, the API package and the link parameters.
    pub grpc: Option<GrpcSettings>,
    /// xray-grpc (required): the secret the users' uuids are derived from.
    pub key_secret: Option<String>,
}

impl fmt::Debug for ServerEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerEndpoint")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("api_url", &redact_url(&self.api_url))
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("cert_sha256", &self.cert_sha256)
            .field("grpc", &self.grpc)
            .field(
                "key_secret",
                &self.key_secret.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// A key that exists on the server for a subscription.
#[derive(Clone, PartialEq, Eq)]
pub struct ProvisionedKey {
    /// V2Ray user uuid or Outline access key id.
    pub server_key_id: String,
    /// The share link (`vless://…`, `ss://…`): a credential, so `Debug` does not print it.
    pub link: String,
    /// The key already existed (made by an earlier attempt) and was adopted, not created now.
    pub adopted: bool,
}

impl fmt::Debug for ProvisionedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProvisionedKey")
            .field("server_key_id", &self.server_key_id)
            .field("link", &format_args!("<{} chars>", self.link.len()))
            .field("adopted", &self.adopted)
            .finish()
    }
}

/// A delete succeeded either way: the key was deleted now, or was not there (404).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted,
    AlreadyGone,
}

/// A key as a server lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteKey {
    pub server_key_id: String,
    /// V2Ray: the user's email; Outline: the key's name. A name that fails the checks of
    /// [`VpnClient::list_keys`] is shown with U+FFFD for its control characters.
    pub name: String,
    /// The subscription, if keyfleet created the key; `None` for keys made by hand and keys with
    /// an invalid name.
    pub owner: Option<SubscriptionId>,
}

/// Traffic of one key as the server reports it (cumulative; may reset or go down).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTraffic {
    pub server_key_id: String,
    pub bytes: u64,
}

/// One pooled client per server (build once, reuse: one `reqwest::Client` inside each).
#[derive(Clone)]
pub enum VpnClient {
    V2ray(V2rayClient),
    Outline(OutlineClient),
    XrayGrpc(XrayClient),
}

impl fmt::Debug for VpnClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V2ray(c) => f.debug_tuple("V2ray").field(&c.server()).finish(),
            Self::Outline(c) => f.debug_tuple("Outline").field(&c.server()).finish(),
            Self::XrayGrpc(c) => f.debug_tuple("XrayGrpc").field(&c.server()).finish(),
        }
    }
}

impl VpnClient {
    /// V2Ray needs `api_key`; Outline needs an https URL and a valid `cert_sha256`; otherwise
    /// [`Error::Config`] says what is missing.
    pub fn new(endpoint: &ServerEndpoint, config: &ClientConfig) -> Result<Self> {
        Ok(match endpoint.kind {
            ServerKind::V2ray => Self::V2ray(V2rayClient::new(endpoint, config)?),
            ServerKind::Outline => Self::Outline(OutlineClient::new(endpoint, config)?),
            ServerKind::XrayGrpc => Self::XrayGrpc(XrayClient::new(endpoint, config)?),
        })
    }

    pub fn kind(&self) -> ServerKind {
        match self {
            Self::V2ray(_) => ServerKind::V2ray,
            Self::Outline(_) => ServerKind::Outline,
            Self::XrayGrpc(_) => ServerKind::XrayGrpc,
        }
    }

    /// The redacted API URL, for logs.
    pub fn server(&self) -> &str {
        match self {
            Self::V2ray(c) => c.server(),
            Self::Outline(c) => c.server(),
            Self::XrayGrpc(c) => c.server(),
        }
    }

    /// One cheap request, for the circuit breaker's probe: `Ok` if the server answers and
    /// accepts our credentials. V2Ray: `GET /api/keys/<nil uuid>/link` (404 is healthy); Outline:
    /// `GET /server`. Same pooled client, timeouts and error classification as every call.
    pub async fn health(&self) -> Result<()> {
        match self {
            Self::V2ray(c) => c.health().await,
            Self::Outline(c) => c.health().await,
            Self::XrayGrpc(c) => c.health().await,
        }
    }

    /// Idempotent create: makes sure the subscription's key exists and returns its server-side
    /// id and link. `is_retry`: an earlier attempt of this job may have reached the server.
    pub async fn ensure_key(&self, sub: &SubscriptionId, is_retry: bool) -> Result<ProvisionedKey> {
        match self {
            Self::V2ray(c) => c.ensure_key(sub, is_retry).await,
            Self::Outline(c) => c.ensure_key(sub, is_retry).await,
            // The node refuses a second user with the email: an add is idempotent by itself.
            Self::XrayGrpc(c) => c.ensure_key(sub).await,
        }
    }

    /// Deletes a key; a key that is not there (404) is [`DeleteOutcome::AlreadyGone`], a success.
    pub async fn delete_key(&self, server_key_id: &str) -> Result<DeleteOutcome> {
        match self {
            Self::V2ray(c) => c.delete_user(server_key_id).await,
            Self::Outline(c) => c.remove_key(server_key_id).await,
            Self::XrayGrpc(c) => c.delete_user(server_key_id).await,
        }
    }

    /// The key's current share link.
    pub async fn fetch_link(&self, server_key_id: &str) -> Result<String> {
        match self {
            Self::V2ray(c) => Ok(c.get_link(server_key_id).await?.link),
            Self::Outline(c) => c.fetch_link(server_key_id).await,
            Self::XrayGrpc(c) => c.fetch_link(server_key_id),
        }
    }

    /// Every key on the server, in one request.
    ///
    /// One bad entry does not fail the list (the reconcile of the whole server would stop):
    /// - an entry whose id is empty, over [`MAX_ID_BYTES`] or has a control character is left
    ///   out, with a warning: keyfleet could neither store that id nor address the key by it. If
    ///   it was ours, reconcile sees our key missing and recreates it, and the create then meets
    ///   the conflict (409, or Outline's id clash) and fails permanently, visibly;
    /// - an entry whose name is over [`MAX_NAME_BYTES`] or has a control character is reported
    ///   with `owner: None`, as a key made by hand: never adopted, never deleted. Reading it as
    ///   ours could delete a key that is not (`kf-s1\n` would parse as subscription `s1`).
    ///
    /// A bad field in a single-object response (create, get key, get link) is
    /// [`Error::InvalidText`], permanent.
    pub async fn list_keys(&self) -> Result<Vec<RemoteKey>> {
        match self {
            Self::V2ray(c) => c.remote_keys().await,
            Self::Outline(c) => c.remote_keys().await,
            Self::XrayGrpc(c) => c.remote_keys().await?.ok_or_else(|| Error::Config {
                reason: format!(
                    "{}: this node has no list of its users (GetInboundUsers: Xray-core 24.11 and later); reconcile watches its marker user instead",
                    c.server()
                ),
            }),
        }
    }

    /// Traffic per key, in one request. V2Ray: uplink + downlink; Outline: the 30-day transfer.
    pub async fn traffic(&self) -> Result<Vec<KeyTraffic>> {
        match self {
            Self::V2ray(c) => c.traffic().await,
            Self::Outline(c) => c.traffic().await,
            Self::XrayGrpc(c) => c.traffic().await,
        }
    }

    /// Whether a create must look for copies of its key (made by an earlier try) in
    /// [`VpnClient::list_keys`]: not on a gRPC node, which refuses a second user with an email
    /// (and may have no list).
    pub fn can_list(&self) -> bool {
        !matches!(self, Self::XrayGrpc(_))
    }

    /// The server key id the subscription's key has, where it is derived rather than chosen by
    /// the server (a gRPC node: the email), so a delete needs no list to find it.
    pub fn derived_key_id(&self, sub: &SubscriptionId) -> Option<String> {
        match self {
            Self::XrayGrpc(_) => Some(keyfleet_core::owned_v2ray_email(sub)),
            Self::V2ray(_) | Self::Outline(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(kind: ServerKind, url: &str) -> ServerEndpoint {
        ServerEndpoint {
            name: "s".into(),
            kind,
            api_url: Url::parse(url).unwrap(),
            api_key: None,
            cert_sha256: None,
            grpc: None,
            key_secret: None,
        }
    }

    fn config_error(e: &ServerEndpoint) -> String {
        match VpnClient::new(e, &ClientConfig::default()) {
            Err(err @ Error::Config { .. }) => err.to_string(),
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn v2ray_needs_an_api_key() {
        let mut e = endpoint(ServerKind::V2ray, "https://vpn.example.net:8443");
        assert!(config_error(&e).contains("api_key"));
        e.api_key = Some(String::new());
        assert!(config_error(&e).contains("api_key"));
        e.api_key = Some("bad\nkey".into());
        let m = config_error(&e);
        assert!(m.contains("api_key") && !m.contains("bad"), "{m}");
        e.api_key = Some("k".into());
        let c = VpnClient::new(&e, &ClientConfig::default()).unwrap();
        assert_eq!(c.kind(), ServerKind::V2ray);
        assert_eq!(c.server(), "https://vpn.example.net:8443");
    }

    #[test]
    fn outline_needs_https_and_a_valid_pin() {
        let mut e = endpoint(ServerKind::Outline, "https://1.2.3.4:1234/SeCrEt");
        let m = config_error(&e);
        assert!(m.contains("cert_sha256") && !m.contains("SeCrEt"), "{m}");
        e.cert_sha256 = Some("abc".into());
        let m = config_error(&e);
        assert!(m.contains("cert_sha256") && m.contains("64"), "{m}");
        e.cert_sha256 = Some("ab".repeat(32));
        e.api_url = Url::parse("http://1.2.3.4:1234/SeCrEt").unwrap();
        let m = config_error(&e);
        assert!(m.contains("https") && !m.contains("SeCrEt"), "{m}");
        e.api_url = Url::parse("https://1.2.3.4:1234/SeCrEt").unwrap();
        let c = VpnClient::new(&e, &ClientConfig::default()).unwrap();
        assert_eq!(c.kind(), ServerKind::Outline);
        assert_eq!(c.server(), "https://1.2.3.4:1234/…");
        assert!(!format!("{c:?} {e:?}").contains("SeCrEt"));
    }

    #[test]
    fn debug_output_hides_secrets() {
        let k = ProvisionedKey {
            server_key_id: "7".into(),
            link: "ss://c2VjcmV0@h:1".into(),
            adopted: false,
        };
        assert!(!format!("{k:?}").contains("c2VjcmV0"));
        let mut e = endpoint(ServerKind::V2ray, "https://u:pw@vpn.example.net/p");
        e.api_key = Some("topsecret".into());
        let d = format!("{e:?}");
        assert!(!d.contains("topsecret") && !d.contains("pw"), "{d}");
    }
}
