//! Xray-core and V2Ray (v2fly) nodes driven over their own gRPC API: `HandlerService.AlterInbound`
//! adds and removes users of one inbound, `StatsService.QueryStats` reads their traffic counters,
//! `StatsService.GetSysStats` says whether the node answers (and since when it runs).
//!
//! Such a node has no list of users (V2Ray, Xray before 24.11) and keeps the users added over the
//! API in memory only: a restart forgets them. So a user is named and keyed deterministically —
//! email `kf-<sub>@keyfleet.invalid`, uuid derived from the subscription and the server's secret
//! `key_secret` — and its server key id is the email: a retried add that meets "already exists"
//! adopts the user (same uuid, same link), and a remove that meets "not found" is done.
//! A restart is noticed by a marker user (see [`XrayClient::marker_was_missing`]).

use std::{collections::BTreeMap, fmt, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use keyfleet_core::{ServerKind, SubscriptionId, owned_marker_email, owned_v2ray_email};
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;
use tonic::{Code, Status, transport::Channel};

use crate::{
    ClientConfig, DeleteOutcome, Error, KeyTraffic, ProvisionedKey, RemoteKey, Result,
    ServerEndpoint, http::redact_url, text,
};

use keyfleet_proto::xray::{
    app::{
        proxyman::command::{
            AddUserOperation, AlterInboundRequest, AlterInboundResponse, GetInboundUserRequest,
            GetInboundUserResponse, RemoveUserOperation,
        },
        stats::command::{
            QueryStatsRequest, QueryStatsResponse, SysStatsRequest, SysStatsResponse,
        },
    },
    common::{protocol::User, serial::TypedMessage},
    proxy::{vless, vmess},
};

/// Which protobuf package the node serves its API under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrpcApi {
    /// Xray-core: `xray.app.proxyman.command`, `xray.proxy.vless.Account`, ...
    Xray,
    /// V2Ray / v2fly: `v2ray.core.app.proxyman.command`, `v2ray.core.proxy.vless.Account`, ...
    V2ray,
}

impl GrpcApi {
    pub const ALL: [Self; 2] = [Self::Xray, Self::V2ray];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Xray => "xray",
            Self::V2ray => "v2ray",
        }
    }

    /// The package prefix of every message and service: `xray` or `v2ray.core`.
    const fn package(self) -> &'static str {
        match self {
            Self::Xray => "xray",
            Self::V2ray => "v2ray.core",
        }
    }

    /// The full name of a message below the package, e.g. `proxy.vless.Account`.
    pub fn type_name(self, below: &str) -> String {
        format!("{}.{below}", self.package())
    }

    fn path(self, rpc: Rpc) -> String {
        let (service, method) = rpc.service_and_method();
        format!("/{}.{service}/{method}", self.package())
    }
}

impl std::str::FromStr for GrpcApi {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "xray" => Ok(Self::Xray),
            "v2ray" => Ok(Self::V2ray),
            other => Err(format!(
                "{other:?} is not one of \"xray\" (Xray-core), \"v2ray\" (V2Ray/v2fly)"
            )),
        }
    }
}

/// The account type of the inbound's users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountKind {
    Vless,
    Vmess,
}

/// Transport security of the inbound, as the client link states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkSecurity {
    None,
    Tls,
    Reality,
}

/// What every client link of the server carries besides the user's uuid: how clients reach the
/// inbound. Validated by the caller (`keyfleet::servers`); stored as JSON with the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkParams {
    /// Host name or IP clients connect to.
    pub address: String,
    pub port: u16,
    pub security: LinkSecurity,
    /// `tcp`, `ws`, `grpc`, `httpupgrade`, `xhttp`, ...
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// uTLS fingerprint (`chrome`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpn: Option<String>,
    /// Reality: the server's public key (`pbk`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// Reality: the short id (`sid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub short_id: Option<String>,
    /// Reality: the spider path (`spx`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spider_x: Option<String>,
    /// VLESS flow, e.g. `xtls-rprx-vision`; also set on the user's account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<String>,
    /// ws / httpupgrade / xhttp path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// ws / httpupgrade / xhttp Host header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// grpc transport service name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// The link's `#` label; the server's name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remark: Option<String>,
}

/// Everything an `xray-grpc` server stores besides its API URL and its key secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrpcSettings {
    /// The tag of the inbound users are added to.
    pub inbound_tag: String,
    /// The API's package; `None`: detected on first use (Xray first, then V2Ray).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<GrpcApi>,
    pub protocol: AccountKind,
    pub link: LinkParams,
}

/// The rpcs keyfleet calls.
#[derive(Debug, Clone, Copy)]
enum Rpc {
    AlterInbound,
    GetInboundUsers,
    QueryStats,
    GetSysStats,
}

impl Rpc {
    const fn service_and_method(self) -> (&'static str, &'static str) {
        match self {
            Self::AlterInbound => ("app.proxyman.command.HandlerService", "AlterInbound"),
            Self::GetInboundUsers => ("app.proxyman.command.HandlerService", "GetInboundUsers"),
            Self::QueryStats => ("app.stats.command.StatsService", "QueryStats"),
            Self::GetSysStats => ("app.stats.command.StatsService", "GetSysStats"),
        }
    }

    /// The `endpoint` label of the request metric, and the name in error messages.
    const fn label(self) -> &'static str {
        match self {
            Self::AlterInbound => "AlterInbound",
            Self::GetInboundUsers => "GetInboundUsers",
            Self::QueryStats => "QueryStats",
            Self::GetSysStats => "GetSysStats",
        }
    }
}

/// Client of one node; cheap to clone (the HTTP/2 channel is shared and multiplexed).
#[derive(Clone)]
pub struct XrayClient {
    inner: Arc<Inner>,
}

struct Inner {
    channel: Channel,
    server: String,
    label: String,
    settings: GrpcSettings,
    /// The uuid namespace of this server's users, from its `key_secret`.
    uuid_namespace: uuid::Uuid,
    api: OnceCell<GrpcApi>,
}

impl fmt::Debug for XrayClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XrayClient")
            .field("server", &self.inner.server)
            .field("inbound_tag", &self.inner.settings.inbound_tag)
            .finish_non_exhaustive()
    }
}

/// What a user add or remove came to.
enum Altered {
    Done,
    /// "User ... already exists." / "User ... not found.".
    AlreadySo,
}

impl XrayClient {
    /// Needs `grpc` settings and a `key_secret`; the URL must be `http://` (the node's API speaks
    /// plaintext HTTP/2; reach a remote one through a tunnel).
    pub fn new(endpoint: &ServerEndpoint, config: &ClientConfig) -> Result<Self> {
        let server = redact_url(&endpoint.api_url);
        let config_error = |reason: String| Error::Config { reason };
        if endpoint.kind != ServerKind::XrayGrpc {
            return Err(config_error(format!(
                "{server} is a {} server, not xray-grpc",
                endpoint.kind
            )));
        }
        if endpoint.api_url.scheme() != "http" {
            return Err(config_error(format!(
                "the gRPC API URL of {server} must be http:// (plaintext HTTP/2)"
            )));
        }
        let settings = endpoint.grpc.clone().ok_or_else(|| {
            config_error(format!("xray-grpc server {server} has no gRPC settings"))
        })?;
        let secret = endpoint
            .key_secret
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| config_error(format!("xray-grpc server {server} has no key_secret")))?;
        let uri = format!(
            "http://{}:{}",
            endpoint.api_url.host_str().unwrap_or_default(),
            endpoint.api_url.port_or_known_default().unwrap_or(80)
        );
        let channel = Channel::from_shared(uri)
            .map_err(|e| config_error(format!("the gRPC API URL of {server}: {e}")))?
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self {
            inner: Arc::new(Inner {
                channel,
                server,
                label: endpoint.name.clone(),
                uuid_namespace: uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, secret.as_bytes()),
                api: OnceCell::new_with(settings.api),
                settings,
            }),
        })
    }

    /// The redacted API URL.
    pub fn server(&self) -> &str {
        &self.inner.server
    }

    pub fn settings(&self) -> &GrpcSettings {
        &self.inner.settings
    }

    /// The uuid of the subscription's user on this server: deterministic (a retried add makes
    /// the same user), and unguessable without the server's key secret.
    pub fn user_uuid(&self, sub: &SubscriptionId) -> uuid::Uuid {
        uuid::Uuid::new_v5(
            &self.inner.uuid_namespace,
            owned_v2ray_email(sub).as_bytes(),
        )
    }

    /// `GetSysStats`: the node answers (and, if not configured, which package it serves).
    pub async fn health(&self) -> Result<()> {
        self.uptime().await.map(drop)
    }

    /// Seconds since the node started.
    pub async fn uptime(&self) -> Result<Duration> {
        let reply: SysStatsResponse = self.call(Rpc::GetSysStats, SysStatsRequest {}).await?;
        Ok(Duration::from_secs(reply.uptime.into()))
    }

    /// Adds the subscription's user; "already exists" adopts it (same email, same uuid).
    pub async fn ensure_key(&self, sub: &SubscriptionId) -> Result<ProvisionedKey> {
        let email = owned_v2ray_email(sub);
        let uuid = self.user_uuid(sub);
        let adopted = matches!(self.add_user(&email, uuid).await?, Altered::AlreadySo);
        if adopted {
            tracing::info!(server = %self.server(), subscription = %sub, "Adopted an existing user of the gRPC node");
        }
        Ok(ProvisionedKey {
            link: self.link(uuid, &email)?,
            server_key_id: email,
            adopted,
        })
    }

    /// Removes the user with this email (the server key id); "not found" is already gone.
    pub async fn delete_user(&self, email: &str) -> Result<DeleteOutcome> {
        let api = self.api().await?;
        let op = RemoveUserOperation {
            email: email.to_owned(),
        };
        Ok(
            match self.alter(api, "RemoveUserOperation", op, email).await? {
                Altered::Done => DeleteOutcome::Deleted,
                Altered::AlreadySo => DeleteOutcome::AlreadyGone,
            },
        )
    }

    /// The link of the user with this email, built from the server's link parameters (the node
    /// has no link to give). An email keyfleet did not make is [`Error::NotFound`].
    pub fn fetch_link(&self, email: &str) -> Result<String> {
        let sub =
            keyfleet_core::subscription_of_owned_name(email).ok_or_else(|| Error::NotFound {
                server: self.server().to_owned(),
                what: format!("a keyfleet user with email {email:?}"),
            })?;
        self.link(self.user_uuid(&sub), email)
    }

    /// Adds the marker user (a uuid nobody holds, outside every subscription's name) and says
    /// whether it was missing: true when the node lost its API-added users (a restart) since
    /// the last call, or on the first call. `forget_marker` undoes it, so a caller that could
    /// not act on a `true` sees it again next time.
    pub async fn marker_was_missing(&self) -> Result<bool> {
        let email = owned_marker_email();
        let uuid = uuid::Uuid::new_v5(&self.inner.uuid_namespace, email.as_bytes());
        Ok(matches!(self.add_user(&email, uuid).await?, Altered::Done))
    }

    pub async fn forget_marker(&self) -> Result<()> {
        self.delete_user(&owned_marker_email()).await.map(drop)
    }

    /// Every user of the inbound as a [`RemoteKey`] named by email (`GetInboundUsers`, Xray-core
    /// 24.11 and later); `None` when the node has no such call (V2Ray, older Xray). Users whose
    /// email fails the text checks are reported as not keyfleet's (see
    /// [`crate::VpnClient::list_keys`]).
    pub async fn remote_keys(&self) -> Result<Option<Vec<RemoteKey>>> {
        let api = self.api().await?;
        let request = GetInboundUserRequest {
            tag: self.inner.settings.inbound_tag.clone(),
            email: String::new(),
        };
        let reply: GetInboundUserResponse =
            match self.call_with(api, Rpc::GetInboundUsers, request).await {
                Ok(reply) => reply,
                Err(status) if status.code() == Code::Unimplemented => return Ok(None),
                Err(status) => return Err(self.error(Rpc::GetInboundUsers, &status)),
            };
        let users = reply
            .users
            .into_iter()
            .filter(|u| !u.email.is_empty())
            .map(|u| (u.email.to_ascii_lowercase(), u.email));
        Ok(Some(text::remote_keys(
            self.server(),
            "GetInboundUsers",
            users,
        )))
    }

    /// `QueryStats` of `user>>>`: uplink + downlink per email (the server key id). Counters start
    /// at zero when the node restarts.
    pub async fn traffic(&self) -> Result<Vec<KeyTraffic>> {
        let reply: QueryStatsResponse = self
            .call(
                Rpc::QueryStats,
                QueryStatsRequest {
                    pattern: "user>>>".into(),
                    reset: false,
                },
            )
            .await?;
        let mut per_user: BTreeMap<String, u64> = BTreeMap::new();
        for stat in reply.stat {
            // user>>>EMAIL>>>traffic>>>uplink|downlink
            let mut parts = stat.name.split(">>>");
            let (Some("user"), Some(email), Some("traffic"), Some("uplink" | "downlink"), None) = (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
            ) else {
                continue;
            };
            if text::check_id(email).is_err() {
                continue;
            }
            let bytes = u64::try_from(stat.value).unwrap_or(0);
            let total = per_user.entry(email.to_ascii_lowercase()).or_default();
            *total = total.saturating_add(bytes);
        }
        Ok(per_user
            .into_iter()
            .map(|(server_key_id, bytes)| KeyTraffic {
                server_key_id,
                bytes,
            })
            .collect())
    }

    /// [`Self::traffic`] with when the node started (now − uptime), read before and after it: a
    /// node that restarted in between gave counters of either life, so that reading is
    /// [`Error::Interrupted`] (retryable) instead.
    pub async fn traffic_since_start(&self) -> Result<(Vec<KeyTraffic>, DateTime<Utc>)> {
        let before = self.started_at().await?;
        let traffic = self.traffic().await?;
        let after = self.started_at().await?;
        if (after - before).abs() > chrono::Duration::seconds(5) {
            return Err(Error::Interrupted {
                server: self.server().to_owned(),
                endpoint: Rpc::QueryStats.label().to_owned(),
                detail: "the node restarted during the reading".into(),
            });
        }
        Ok((traffic, after))
    }

    async fn started_at(&self) -> Result<DateTime<Utc>> {
        let uptime = self.uptime().await?;
        Ok(Utc::now() - chrono::Duration::from_std(uptime).unwrap_or_default())
    }

    async fn add_user(&self, email: &str, uuid: uuid::Uuid) -> Result<Altered> {
        let api = self.api().await?;
        let settings = &self.inner.settings;
        let account = match settings.protocol {
            AccountKind::Vless => TypedMessage {
                r#type: api.type_name("proxy.vless.Account"),
                value: vless::Account {
                    id: uuid.to_string(),
                    flow: settings.link.flow.clone().unwrap_or_default(),
                    encryption: "none".into(),
                }
                .encode_to_vec(),
            },
            AccountKind::Vmess => TypedMessage {
                r#type: api.type_name("proxy.vmess.Account"),
                value: vmess::Account {
                    id: uuid.to_string(),
                    alter_id: 0,
                    // AUTO
                    security_settings: Some(vmess::SecurityConfig { r#type: 2 }),
                }
                .encode_to_vec(),
            },
        };
        let op = AddUserOperation {
            user: Some(User {
                level: 0,
                email: email.to_owned(),
                account: Some(account),
            }),
        };
        self.alter(api, "AddUserOperation", op, email).await
    }

    async fn alter(
        &self,
        api: GrpcApi,
        operation: &str,
        op: impl Message,
        email: &str,
    ) -> Result<Altered> {
        let request = AlterInboundRequest {
            tag: self.inner.settings.inbound_tag.clone(),
            operation: Some(TypedMessage {
                r#type: api.type_name(&format!("app.proxyman.command.{operation}")),
                value: op.encode_to_vec(),
            }),
        };
        match self
            .call_with::<_, AlterInboundResponse>(api, Rpc::AlterInbound, request)
            .await
        {
            Ok(_) => Ok(Altered::Done),
            Err(status) => {
                // V2Ray and Xray answer a duplicate add with "User <email> already exists." and a
                // remove of an unknown user with "User <email> not found." (code Unknown), under
                // their error chain's prefixes. An unknown inbound tag is also "not found", but
                // not of the user: it stays an error.
                let message = status.message().to_ascii_lowercase();
                let user = format!("user {}", email.to_ascii_lowercase());
                let already = if operation == "AddUserOperation" {
                    "already exists"
                } else {
                    "not found"
                };
                if status.code() == Code::Unknown && message.contains(&format!("{user} {already}"))
                {
                    return Ok(Altered::AlreadySo);
                }
                Err(self.error(Rpc::AlterInbound, &status))
            }
        }
    }

    /// The API package: configured, or found by asking `GetSysStats` under each (once).
    async fn api(&self) -> Result<GrpcApi> {
        self.inner
            .api
            .get_or_try_init(|| async {
                for api in GrpcApi::ALL {
                    match self
                        .call_with::<_, SysStatsResponse>(api, Rpc::GetSysStats, SysStatsRequest {})
                        .await
                    {
                        Ok(_) => {
                            tracing::info!(server = %self.server(), api = api.as_str(), "Detected the gRPC API of the node.");
                            return Ok(api);
                        }
                        Err(status) if status.code() == Code::Unimplemented => continue,
                        Err(status) => return Err(self.error(Rpc::GetSysStats, &status)),
                    }
                }
                Err(Error::Rpc {
                    server: self.server().to_owned(),
                    endpoint: Rpc::GetSysStats.label().to_owned(),
                    code: format!("{:?}", Code::Unimplemented),
                    message: "the node serves neither the Xray-core nor the V2Ray StatsService (is StatsService in its api.services?)".into(),
                })
            })
            .await
            .copied()
    }

    async fn call<Req, Resp>(&self, rpc: Rpc, request: Req) -> Result<Resp>
    where
        Req: Message + Send + Sync + 'static,
        Resp: Message + Default + Send + Sync + 'static,
    {
        let api = self.api().await?;
        self.call_with(api, rpc, request)
            .await
            .map_err(|status| self.error(rpc, &status))
    }

    async fn call_with<Req, Resp>(
        &self,
        api: GrpcApi,
        rpc: Rpc,
        request: Req,
    ) -> Result<Resp, Status>
    where
        Req: Message + Send + Sync + 'static,
        Resp: Message + Default + Send + Sync + 'static,
    {
        let path = http::uri::PathAndQuery::try_from(api.path(rpc))
            .map_err(|e| Status::internal(e.to_string()))?;
        let started = std::time::Instant::now();
        let mut grpc = tonic::client::Grpc::new(self.inner.channel.clone());
        let result = match grpc.ready().await {
            Ok(()) => grpc
                .unary(
                    tonic::Request::new(request),
                    path,
                    tonic_prost::ProstCodec::<Req, Resp>::default(),
                )
                .await
                .map(tonic::Response::into_inner),
            Err(e) => Err(Status::unavailable(e.to_string())),
        };
        let status = match &result {
            Ok(_) => "ok",
            Err(s)
                if matches!(
                    s.code(),
                    Code::Unknown | Code::InvalidArgument | Code::NotFound | Code::AlreadyExists
                ) =>
            {
                "rejected"
            }
            Err(_) => "error",
        };
        metrics::histogram!(
            crate::REQUEST_DURATION_METRIC,
            "server" => self.inner.label.clone(),
            "endpoint" => rpc.label(),
            "status" => status,
        )
        .record(started.elapsed().as_secs_f64());
        result
    }

    /// A gRPC status as an [`Error`], classified like the HTTP ones: the transport's failures
    /// (unavailable, deadline, cancelled) retry, the node's refusals do not.
    fn error(&self, rpc: Rpc, status: &Status) -> Error {
        let server = self.server().to_owned();
        let endpoint = rpc.label().to_owned();
        let detail = text::printable_name(&truncate(status.message(), 300));
        match status.code() {
            Code::Unavailable => Error::Connect { server, detail },
            Code::DeadlineExceeded | Code::Cancelled => Error::Timeout { server, endpoint },
            Code::ResourceExhausted => Error::RateLimited {
                server,
                retry_after: None,
            },
            Code::Unauthenticated | Code::PermissionDenied => Error::Unauthorized { server },
            Code::Internal | Code::Aborted | Code::DataLoss => Error::ServerError {
                server,
                endpoint,
                status: 500,
                body: detail,
            },
            code => Error::Rpc {
                server,
                endpoint,
                code: format!("{code:?}"),
                message: detail,
            },
        }
    }

    fn link(&self, uuid: uuid::Uuid, email: &str) -> Result<String> {
        let link = build_link(&self.inner.settings, uuid, &self.inner.label);
        text::check_link(&link).map_err(|flaw| Error::InvalidText {
            server: self.server().to_owned(),
            endpoint: "link".into(),
            detail: format!("the link built for {email} is {flaw}"),
        })?;
        Ok(link)
    }
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// The client link: `vless://UUID@HOST:PORT?...#REMARK`, or `vmess://` + base64 of the
/// v2rayN JSON.
pub fn build_link(settings: &GrpcSettings, uuid: uuid::Uuid, server_name: &str) -> String {
    let l = &settings.link;
    let remark = l.remark.as_deref().unwrap_or(server_name);
    let host = if l.address.contains(':') && !l.address.starts_with('[') {
        format!("[{}]", l.address)
    } else {
        l.address.clone()
    };
    let security = match l.security {
        LinkSecurity::None => "none",
        LinkSecurity::Tls => "tls",
        LinkSecurity::Reality => "reality",
    };
    match settings.protocol {
        AccountKind::Vless => {
            let mut query = url::form_urlencoded::Serializer::new(String::new());
            query.append_pair("encryption", "none");
            query.append_pair("security", security);
            query.append_pair("type", &l.network);
            let optional = [
                ("flow", &l.flow),
                ("sni", &l.sni),
                ("fp", &l.fingerprint),
                ("alpn", &l.alpn),
                ("pbk", &l.public_key),
                ("sid", &l.short_id),
                ("spx", &l.spider_x),
                ("path", &l.path),
                ("host", &l.host),
                ("serviceName", &l.service_name),
            ];
            for (name, value) in optional {
                if let Some(value) = value {
                    query.append_pair(name, value);
                }
            }
            let fragment: String =
                url::form_urlencoded::byte_serialize(remark.as_bytes()).collect();
            format!(
                "vless://{uuid}@{host}:{}?{}#{}",
                l.port,
                query.finish(),
                fragment.replace('+', "%20")
            )
        }
        AccountKind::Vmess => {
            use base64::Engine as _;
            let json = serde_json::json!({
                "v": "2",
                "ps": remark,
                "add": l.address,
                "port": l.port.to_string(),
                "id": uuid.to_string(),
                "aid": "0",
                "scy": "auto",
                "net": l.network,
                "type": "none",
                "host": l.host.clone().unwrap_or_default(),
                "path": l.path.clone().or_else(|| l.service_name.clone()).unwrap_or_default(),
                "tls": if l.security == LinkSecurity::Tls { "tls" } else { "" },
                "sni": l.sni.clone().unwrap_or_default(),
                "alpn": l.alpn.clone().unwrap_or_default(),
                "fp": l.fingerprint.clone().unwrap_or_default(),
            });
            format!(
                "vmess://{}",
                base64::engine::general_purpose::STANDARD.encode(json.to_string())
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(protocol: AccountKind, security: LinkSecurity) -> GrpcSettings {
        GrpcSettings {
            inbound_tag: "in".into(),
            api: None,
            protocol,
            link: LinkParams {
                address: "vpn.example.net".into(),
                port: 443,
                security,
                network: "tcp".into(),
                sni: Some("www.example.com".into()),
                fingerprint: Some("chrome".into()),
                alpn: None,
                public_key: Some("PbK".into()),
                short_id: Some("ab12".into()),
                spider_x: None,
                flow: Some("xtls-rprx-vision".into()),
                path: None,
                host: None,
                service_name: None,
                remark: Some("DE 1".into()),
            },
        }
    }

    #[test]
    fn vless_reality_link_carries_every_parameter() {
        let uuid = uuid::Uuid::nil();
        let link = build_link(
            &settings(AccountKind::Vless, LinkSecurity::Reality),
            uuid,
            "de-1",
        );
        assert_eq!(
            link,
            "vless://00000000-0000-0000-0000-000000000000@vpn.example.net:443?encryption=none&security=reality&type=tcp&flow=xtls-rprx-vision&sni=www.example.com&fp=chrome&pbk=PbK&sid=ab12#DE%201"
        );
        let parsed = url::Url::parse(&link).unwrap();
        assert_eq!(parsed.username(), uuid.to_string());
    }

    #[test]
    fn vmess_link_is_base64_json_and_ipv6_is_bracketed_in_vless() {
        use base64::Engine as _;
        let link = build_link(
            &settings(AccountKind::Vmess, LinkSecurity::Tls),
            uuid::Uuid::nil(),
            "s",
        );
        let json = base64::engine::general_purpose::STANDARD
            .decode(link.strip_prefix("vmess://").unwrap())
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["add"], "vpn.example.net");
        assert_eq!(v["port"], "443");
        assert_eq!(v["tls"], "tls");
        let mut s = settings(AccountKind::Vless, LinkSecurity::None);
        s.link.address = "2001:db8::1".into();
        s.link.remark = None;
        let link = build_link(&s, uuid::Uuid::nil(), "de-1");
        assert!(
            link.contains("@[2001:db8::1]:443?") && link.ends_with("#de-1"),
            "{link}"
        );
    }

    #[test]
    fn api_paths_and_type_names_per_package() {
        assert_eq!(
            GrpcApi::Xray.path(Rpc::AlterInbound),
            "/xray.app.proxyman.command.HandlerService/AlterInbound"
        );
        assert_eq!(
            GrpcApi::V2ray.path(Rpc::QueryStats),
            "/v2ray.core.app.stats.command.StatsService/QueryStats"
        );
        assert_eq!(
            GrpcApi::V2ray.type_name("proxy.vless.Account"),
            "v2ray.core.proxy.vless.Account"
        );
    }
}
