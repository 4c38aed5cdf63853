//! The Outline server management API (`shared/specs/outline-server-api.md`): the secret is the
//! URL path prefix, the certificate is pinned. From v1.8.0 keys are created with a chosen id
//! (`PUT /access-keys/{id}`), which makes creation idempotent; older servers pick the id, so a
//! retry finds an earlier attempt's key by its name.

use std::{collections::BTreeMap, fmt, sync::Arc};

use keyfleet_core::{
    ServerKind, SubscriptionId, owned_key_name, owned_outline_key_id, subscription_of_owned_name,
};
use reqwest::{Method, StatusCode, header::HeaderMap};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use crate::{
    ClientConfig, DeleteOutcome, Error, KeyTraffic, ProvisionedKey, RemoteKey, Result,
    ServerEndpoint,
    de::{lenient_u64, null_as_empty, number_to_u64, string_or_number},
    http::{Http, redact_url},
    parse_cert_sha256,
    text::{self, check_id, check_link, check_name},
};

/// The key id [`OutlineClient::supports_chosen_ids`] asks for. keyfleet's ids are `kf-…`, so
/// it names no key of ours; if someone made one, its 200 answers the question just as well.
const PROBE_ID: &str = "keyfleet-probe";

/// `GET /server`. Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerInfo {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub server_id: Option<String>,
    #[serde(default)]
    pub metrics_enabled: Option<bool>,
    #[serde(default)]
    pub created_timestamp_ms: Option<u64>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub version: String,
    #[serde(default)]
    pub port_for_new_access_keys: Option<u16>,
    #[serde(default)]
    pub hostname_for_access_keys: Option<String>,
    #[serde(default)]
    pub access_key_data_limit: Option<DataLimit>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct DataLimit {
    #[serde(default, deserialize_with = "lenient_u64")]
    pub bytes: u64,
}

/// An access key. Unknown fields are ignored; `Debug` hides the password and the access URL.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessKey {
    #[serde(deserialize_with = "string_or_number")]
    pub id: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub name: String,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub data_limit: Option<DataLimit>,
    /// `ss://…`: the credential handed to the user.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub access_url: String,
}

impl fmt::Debug for AccessKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessKey")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("port", &self.port)
            .field("method", &self.method)
            .field("data_limit", &self.data_limit)
            .field(
                "access_url",
                &format_args!("<{} chars>", self.access_url.len()),
            )
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AccessKeyList {
    access_keys: Vec<AccessKey>,
}

/// `GET /metrics/transfer`: bytes per key id over the last 30 days.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransferMetrics {
    #[serde(default, deserialize_with = "bytes_by_id")]
    pub bytes_transferred_by_user_id: BTreeMap<String, u64>,
}

fn bytes_by_id<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<BTreeMap<String, u64>, D::Error> {
    let raw =
        Option::<BTreeMap<String, Option<serde_json::Number>>>::deserialize(d)?.unwrap_or_default();
    Ok(raw
        .into_iter()
        .map(|(id, n)| (id, n.map(number_to_u64).unwrap_or(0)))
        .collect())
}

#[derive(Serialize)]
struct KeyName<'a> {
    name: &'a str,
}

/// What the server's API has, probed once per client.
#[derive(Debug)]
struct Api {
    chosen_ids: bool,
}

struct Inner {
    http: Http,
    api: OnceCell<Api>,
}

/// Client of one Outline server; cheap to clone (the pooled HTTP client and the probed API are
/// shared).
#[derive(Clone)]
pub struct OutlineClient {
    inner: Arc<Inner>,
}

impl OutlineClient {
    pub fn new(endpoint: &ServerEndpoint, config: &ClientConfig) -> Result<Self> {
        let server = redact_url(&endpoint.api_url);
        if endpoint.kind != ServerKind::Outline {
            return Err(Error::Config {
                reason: format!("{server} is a {} server, not outline", endpoint.kind),
            });
        }
        if endpoint.api_url.scheme() != "https" {
            return Err(Error::Config {
                reason: format!(
                    "Outline server {server}: apiUrl must be https (the certificate is pinned)"
                ),
            });
        }
        let raw = endpoint.cert_sha256.as_deref().ok_or_else(|| Error::Config {
            reason: format!("Outline server {server} has no cert_sha256 (the installer's certSha256); it is required"),
        })?;
        let pin = parse_cert_sha256(raw).map_err(|e| Error::Config {
            reason: format!("cert_sha256 of Outline server {server}: {e}"),
        })?;
        let http = Http::new(
            &endpoint.api_url,
            config,
            HeaderMap::new(),
            Some(pin),
            &endpoint.name,
        )?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                api: OnceCell::new(),
            }),
        })
    }

    /// The redacted API URL (no secret prefix).
    pub fn server(&self) -> &str {
        self.inner.http.server()
    }

    fn http(&self) -> &Http {
        &self.inner.http
    }

    /// `GET /server`. A 404 here means the secret prefix is wrong.
    pub async fn server_info(&self) -> Result<ServerInfo> {
        self.server_info_as("server_info").await
    }

    /// `GET /server`, counted in the request metrics as `operation`.
    async fn server_info_as(&self, operation: &'static str) -> Result<ServerInfo> {
        let reply = self
            .http()
            .call(operation, Method::GET, &["server"])
            .await?;
        if reply.status == StatusCode::NOT_FOUND {
            return Err(Error::NotFound {
                server: self.server().to_owned(),
                what: "the Outline API: GET /server returned 404; is the secret prefix of apiUrl right?".into(),
            });
        }
        self.http().json(reply)
    }

    /// `POST /access-keys {name}`: the server picks the id.
    pub async fn create_key_post(&self, name: &str) -> Result<AccessKey> {
        let reply = self
            .http()
            .call_json(
                "create_key_post",
                Method::POST,
                &["access-keys"],
                &KeyName { name },
            )
            .await?;
        self.checked_key(self.http().json(reply)?, "POST /access-keys")
    }

    /// `PUT /access-keys/{id} {name}` (v1.8.0+): 409 ([`Error::Conflict`]) if the id exists.
    pub async fn create_key_put(&self, id: &str, name: &str) -> Result<AccessKey> {
        self.check_id(id)?;
        let reply = self
            .http()
            .call_json(
                "create_key_put",
                Method::PUT,
                &["access-keys", id],
                &KeyName { name },
            )
            .await?;
        self.checked_key(self.http().json(reply)?, &format!("PUT /access-keys/{id}"))
    }

    /// `GET /access-keys/{id}` (v1.8.0+).
    pub async fn get_key(&self, id: &str) -> Result<AccessKey> {
        self.check_id(id)?;
        let reply = self
            .http()
            .call("get_key", Method::GET, &["access-keys", id])
            .await?;
        self.checked_key(self.http().json(reply)?, &format!("GET /access-keys/{id}"))
    }

    /// `GET /access-keys`. Keys whose id is not valid are left out (see
    /// [`crate::VpnClient::list_keys`]).
    pub async fn list_keys(&self) -> Result<Vec<AccessKey>> {
        let reply = self
            .http()
            .call("list_keys", Method::GET, &["access-keys"])
            .await?;
        let keys = self.http().json::<AccessKeyList>(reply)?.access_keys;
        Ok(text::with_valid_ids(
            self.server(),
            "GET /access-keys",
            keys,
            |k: &AccessKey| &k.id,
        ))
    }

    /// `DELETE /access-keys/{id}`: 204 deleted, 404 already gone. Note that a wrong secret
    /// prefix also gives 404; [`OutlineClient::remove_key`] rules that out first.
    pub async fn delete_key(&self, id: &str) -> Result<DeleteOutcome> {
        self.check_id(id)?;
        let reply = self
            .http()
            .call("delete_key", Method::DELETE, &["access-keys", id])
            .await?;
        if reply.status == StatusCode::NOT_FOUND {
            return Ok(DeleteOutcome::AlreadyGone);
        }
        self.http().success(reply)?;
        Ok(DeleteOutcome::Deleted)
    }

    /// `PUT /access-keys/{id}/name {name}`.
    pub async fn rename_key(&self, id: &str, name: &str) -> Result<()> {
        self.check_id(id)?;
        let reply = self
            .http()
            .call_json(
                "rename_key",
                Method::PUT,
                &["access-keys", id, "name"],
                &KeyName { name },
            )
            .await?;
        self.http().success(reply)?;
        Ok(())
    }

    /// `GET /metrics/transfer`.
    pub async fn transfer(&self) -> Result<TransferMetrics> {
        let reply = self
            .http()
            .call("transfer", Method::GET, &["metrics", "transfer"])
            .await?;
        self.http().json(reply)
    }

    /// Whether the server takes chosen ids (`PUT`/`GET /access-keys/{id}`, v1.8.0+), probed once
    /// per client (a failure is not cached). The version cannot tell: a server built from source
    /// reports `"dev"`. So, as the spec measured on the real server, `GET /access-keys/<PROBE_ID>`:
    /// 404 `{"code": "NotFound"}` (or 200) means the route exists; 405 (restify: the path exists
    /// for `DELETE` only) means an older server; a 404 with another code (`ResourceNotFound`) is
    /// an older server too, unless the secret prefix is wrong, which also 404s everything: then
    /// `GET /server` decides. Never creates anything.
    pub async fn supports_chosen_ids(&self) -> Result<bool> {
        let api = self
            .inner
            .api
            .get_or_try_init(|| async {
                let reply = self
                    .http()
                    .call("probe_key_ids", Method::GET, &["access-keys", PROBE_ID])
                    .await?;
                let chosen_ids = match probe_verdict(reply.status, &reply.body) {
                    Some(Probe::Route) => true,
                    Some(Probe::NoRoute) => false,
                    Some(Probe::NoRouteOrWrongPrefix) => {
                        self.server_info().await?;
                        false
                    }
                    None => return Err(self.http().status_error(&reply)),
                };
                tracing::debug!(server = %self.server(), chosen_ids, "Probed the Outline API");
                Ok::<_, Error>(Api { chosen_ids })
            })
            .await?;
        Ok(api.chosen_ids)
    }

    /// A cheap request that says whether the server answers: `GET /server`, through the same
    /// client, timeouts and error classification as every other call.
    pub async fn health(&self) -> Result<()> {
        self.server_info_as("health").await.map(drop)
    }

    /// Idempotent create, see [`crate::VpnClient::ensure_key`]. v1.8.0+: `PUT` the
    /// subscription's id, and on 409 adopt the key there if its name is ours. Older: on a retry
    /// adopt a key with our name from the list, else `POST`.
    pub async fn ensure_key(&self, sub: &SubscriptionId, is_retry: bool) -> Result<ProvisionedKey> {
        let name = owned_key_name(sub);
        let (key, adopted) = if self.supports_chosen_ids().await? {
            let id = owned_outline_key_id(sub);
            match self.create_key_put(&id, &name).await {
                Ok(key) => (key, false),
                Err(Error::Conflict { server, detail }) => match self.get_key(&id).await {
                    Ok(key) if subscription_of_owned_name(&key.name).as_ref() == Some(sub) => {
                        (key, true)
                    }
                    Ok(_) => return Err(Error::ForeignKey { server, id }),
                    Err(Error::NotFound { .. }) => {
                        return Err(Error::Conflict {
                            server,
                            detail: format!("{detail}; yet GET /access-keys/{id} finds no key"),
                        });
                    }
                    Err(e) => return Err(e),
                },
                Err(e) => return Err(e),
            }
        } else {
            let existing = if is_retry {
                oldest_owned(self.list_keys().await?, sub)
            } else {
                None
            };
            match existing {
                Some(key) => (key, true),
                None => {
                    let mut key = self.create_key_post(&name).await?;
                    if key.name != name {
                        // Servers that ignore the name in the body: the name is what a retry
                        // and the reconcile sweep find the key by.
                        self.rename_key(&key.id, &name).await?;
                        key.name = name;
                    }
                    (key, false)
                }
            }
        };
        if adopted {
            tracing::info!(server = %self.server(), subscription = %sub, key_id = %key.id, "Adopted an existing Outline key");
        }
        let link = self.access_url(&key, "the access key")?;
        Ok(ProvisionedKey {
            server_key_id: key.id,
            link,
            adopted,
        })
    }

    /// The key's access URL: `GET /access-keys/{id}` on v1.8.0+, else from the list.
    pub async fn fetch_link(&self, id: &str) -> Result<String> {
        let key = if self.supports_chosen_ids().await? {
            self.get_key(id).await?
        } else {
            self.list_keys()
                .await?
                .into_iter()
                .find(|k| k.id == id)
                .ok_or_else(|| Error::NotFound {
                    server: self.server().to_owned(),
                    what: format!("access key {id:?} is not in GET /access-keys"),
                })?
        };
        self.access_url(&key, "GET /access-keys")
    }

    /// Deletes a key after making sure the API answers at all (once per client), so that a wrong
    /// secret prefix, which 404s everything, is not taken for "already gone".
    pub async fn remove_key(&self, id: &str) -> Result<DeleteOutcome> {
        self.supports_chosen_ids().await?;
        self.delete_key(id).await
    }

    /// Every key as a [`RemoteKey`] named by its name.
    pub async fn remote_keys(&self) -> Result<Vec<RemoteKey>> {
        let keys = self.list_keys().await?;
        Ok(text::remote_keys(
            self.server(),
            "GET /access-keys",
            keys.into_iter().map(|k| (k.id, k.name)),
        ))
    }

    /// Bytes per key (30-day rolling; keys with no traffic are absent). The `""` entry the server
    /// may report and ids that are not valid are left out.
    pub async fn traffic(&self) -> Result<Vec<KeyTraffic>> {
        let entries: Vec<_> = self
            .transfer()
            .await?
            .bytes_transferred_by_user_id
            .into_iter()
            .filter(|(id, _)| !id.is_empty())
            .collect();
        Ok(
            text::with_valid_ids(self.server(), "GET /metrics/transfer", entries, |e| &e.0)
                .into_iter()
                .map(|(server_key_id, bytes)| KeyTraffic {
                    server_key_id,
                    bytes,
                })
                .collect(),
        )
    }

    /// A key from a single-object response, with its id and name checked.
    fn checked_key(&self, key: AccessKey, endpoint: &str) -> Result<AccessKey> {
        check_id(&key.id).map_err(|flaw| {
            self.http().invalid_text(
                endpoint,
                format!("the Outline server returned an access key id {flaw}"),
            )
        })?;
        check_name(&key.name).map_err(|flaw| {
            self.http().invalid_text(
                endpoint,
                format!(
                    "the Outline server returned a name {flaw} for access key {}",
                    key.id
                ),
            )
        })?;
        Ok(key)
    }

    /// The key's access URL, checked: every link keyfleet stores passes here.
    fn access_url(&self, key: &AccessKey, endpoint: &str) -> Result<String> {
        if key.access_url.is_empty() {
            return Err(Error::Decode {
                server: self.server().to_owned(),
                endpoint: endpoint.to_owned(),
                detail: "the access key has no accessUrl".into(),
            });
        }
        check_link(&key.access_url).map_err(|flaw| {
            self.http().invalid_text(
                endpoint,
                format!(
                    "the Outline server returned an access URL {flaw} for access key {}",
                    key.id
                ),
            )
        })?;
        Ok(key.access_url.clone())
    }

    fn check_id(&self, id: &str) -> Result<()> {
        if id.is_empty() {
            return Err(Error::NotFound {
                server: self.server().to_owned(),
                what: "an access key with an empty id".into(),
            });
        }
        Ok(())
    }
}

/// What the probe of [`OutlineClient::supports_chosen_ids`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Route,
    NoRoute,
    NoRouteOrWrongPrefix,
}

/// `None`: an answer that says nothing about the route (5xx, 429, …), to be raised as an error.
fn probe_verdict(status: StatusCode, body: &[u8]) -> Option<Probe> {
    match status {
        s if s.is_success() => Some(Probe::Route),
        StatusCode::METHOD_NOT_ALLOWED => Some(Probe::NoRoute),
        StatusCode::NOT_FOUND => {
            let code = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("code")?.as_str().map(str::to_owned));
            Some(if code.as_deref() == Some("NotFound") {
                Probe::Route
            } else {
                Probe::NoRouteOrWrongPrefix
            })
        }
        _ => None,
    }
}

/// A key keyfleet made for `sub` (by name); the oldest (smallest numeric id) if several.
fn oldest_owned(keys: Vec<AccessKey>, sub: &SubscriptionId) -> Option<AccessKey> {
    keys.into_iter()
        .enumerate()
        .filter(|(_, k)| {
            check_name(&k.name).is_ok() && subscription_of_owned_name(&k.name).as_ref() == Some(sub)
        })
        .min_by_key(|(i, k)| {
            let numeric = k.id.parse::<u64>().ok();
            (numeric.is_none(), numeric, *i)
        })
        .map(|(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_verdicts() {
        let v = |status: u16, body: &str| {
            probe_verdict(StatusCode::from_u16(status).unwrap(), body.as_bytes())
        };
        assert_eq!(
            v(
                404,
                r#"{"code":"NotFound","message":"Access key not found"}"#
            ),
            Some(Probe::Route)
        );
        assert_eq!(v(200, "{}"), Some(Probe::Route));
        assert_eq!(
            v(405, r#"{"code":"MethodNotAllowed"}"#),
            Some(Probe::NoRoute)
        );
        assert_eq!(
            v(404, r#"{"code":"ResourceNotFound"}"#),
            Some(Probe::NoRouteOrWrongPrefix)
        );
        assert_eq!(v(404, "Not Found"), Some(Probe::NoRouteOrWrongPrefix));
        assert_eq!(v(500, ""), None);
        assert_eq!(v(429, ""), None);
    }

    fn key(id: &str, name: &str) -> AccessKey {
        AccessKey {
            id: id.into(),
            name: name.into(),
            password: None,
            port: None,
            method: None,
            data_limit: None,
            access_url: "ss://x".into(),
        }
    }

    #[test]
    fn adopts_the_oldest_key_with_our_name() {
        let sub = SubscriptionId::parse("s1").unwrap();
        let keys = vec![
            key("3", "alice"),
            key("12", "kf-s1"),
            key("9", "KF-S1"),
            key("2", "kf-s2"),
        ];
        assert_eq!(oldest_owned(keys, &sub).unwrap().id, "9");
        assert!(oldest_owned(vec![key("1", "s1")], &sub).is_none());
        // Trimmed, "kf-s1\n" would parse as ours: a name with a control character never is.
        assert!(oldest_owned(vec![key("1", "kf-s1\n")], &sub).is_none());
    }

    #[test]
    fn decodes_server_json() {
        let k: AccessKey = serde_json::from_str(
            r#"{"id":4,"name":"kf-a","password":"pw","port":1234,"method":"chacha20-ietf-poly1305",
                "accessUrl":"ss://c2VjcmV0@h:1/?outline=1","dataLimit":{"bytes":5},"new":true}"#,
        )
        .unwrap();
        assert_eq!((k.id.as_str(), k.data_limit.unwrap().bytes), ("4", 5));
        let debug = format!("{k:?}");
        assert!(
            !debug.contains("c2VjcmV0") && !debug.contains("pw"),
            "{debug}"
        );
        let t: TransferMetrics =
            serde_json::from_str(r#"{"bytesTransferredByUserId":{"0":10,"kf-a":2.5e3,"x":null}}"#)
                .unwrap();
        assert_eq!(t.bytes_transferred_by_user_id["kf-a"], 2500);
        assert_eq!(t.bytes_transferred_by_user_id["x"], 0);
        let i: ServerInfo =
            serde_json::from_str(r#"{"name":"n","serverId":"id","version":"1.9.0","x":1}"#)
                .unwrap();
        assert_eq!(i.version, "1.9.0");
    }
}
