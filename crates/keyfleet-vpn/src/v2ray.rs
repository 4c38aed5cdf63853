//! The V2Ray panel API (`shared/specs/v2ray-panel-api.md`): `X-API-Key` auth, users keyed by a
//! uuid the panel picks, looked up by the deterministic email keyfleet gives them.

use std::{fmt, sync::Arc};

use chrono::{DateTime, FixedOffset};
use keyfleet_core::{ServerKind, SubscriptionId, owned_key_name, owned_v2ray_email};
use reqwest::{
    Method, StatusCode,
    header::{HeaderMap, HeaderName, HeaderValue},
};
use serde::{Deserialize, Serialize};

use crate::{
    ClientConfig, DeleteOutcome, Error, KeyTraffic, ProvisionedKey, RemoteKey, Result,
    ServerEndpoint,
    de::{lenient_u64, null_as_empty},
    http::{Http, redact_url},
    parse_cert_sha256,
    text::{self, check_id, check_link, check_name},
};

/// The uuid [`V2rayClient::health`] asks about.
const HEALTH_UUID: &str = "00000000-0000-0000-0000-000000000000";

/// A panel user. Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct V2rayUser {
    pub uuid: String,
    pub email: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub name: String,
    /// RFC 3339 as the panel sent it.
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub is_active: Option<bool>,
}

impl V2rayUser {
    fn created(&self) -> Option<DateTime<FixedOffset>> {
        DateTime::parse_from_rfc3339(self.created_at.as_deref()?).ok()
    }
}

/// `GET /api/keys/{uuid}/link`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
pub struct V2rayLink {
    #[serde(default)]
    pub uuid: Option<String>,
    /// `vless://…`: a credential, so `Debug` does not print it.
    pub link: String,
}

impl fmt::Debug for V2rayLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("V2rayLink")
            .field("uuid", &self.uuid)
            .field("link", &format_args!("<{} chars>", self.link.len()))
            .finish()
    }
}

/// `GET /api/stats/users`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct V2rayStats {
    #[serde(default)]
    pub users: Vec<V2rayUserStats>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct V2rayUserStats {
    pub uuid: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub uplink: u64,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub downlink: u64,
}

#[derive(Serialize)]
struct NewUser<'a> {
    email: &'a str,
    name: &'a str,
}

/// Client of one V2Ray panel; cheap to clone (the pooled HTTP client is shared).
#[derive(Clone)]
pub struct V2rayClient {
    http: Arc<Http>,
}

impl V2rayClient {
    pub fn new(endpoint: &ServerEndpoint, config: &ClientConfig) -> Result<Self> {
        let server = redact_url(&endpoint.api_url);
        if endpoint.kind != ServerKind::V2ray {
            return Err(Error::Config {
                reason: format!("{server} is a {} server, not v2ray", endpoint.kind),
            });
        }
        let key = endpoint
            .api_key
            .as_deref()
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| Error::Config {
                reason: format!(
                    "V2Ray server {server} has no api_key (the panel's X-API-Key secret)"
                ),
            })?;
        let mut value = HeaderValue::from_str(key).map_err(|_| Error::Config {
            reason: format!("the api_key of V2Ray server {server} contains characters an HTTP header cannot carry"),
        })?;
        value.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(HeaderName::from_static("x-api-key"), value);

        let pin = match endpoint.cert_sha256.as_deref() {
            None => None,
            Some(raw) => {
                if endpoint.api_url.scheme() != "https" {
                    return Err(Error::Config {
                        reason: format!(
                            "V2Ray server {server} has a cert_sha256 pin but its URL is not https"
                        ),
                    });
                }
                Some(parse_cert_sha256(raw).map_err(|e| Error::Config {
                    reason: format!("cert_sha256 of V2Ray server {server}: {e}"),
                })?)
            }
        };
        Ok(Self {
            http: Arc::new(Http::new(
                &endpoint.api_url,
                config,
                headers,
                pin,
                &endpoint.name,
            )?),
        })
    }

    /// The redacted API URL.
    pub fn server(&self) -> &str {
        self.http.server()
    }

    /// `POST /api/users`. A panel that already has the email answers 409 ([`Error::Conflict`]);
    /// some panels create a second user instead.
    pub async fn create_user(&self, email: &str, name: &str) -> Result<V2rayUser> {
        let reply = self
            .http
            .call_json(
                "create_user",
                Method::POST,
                &["api", "users"],
                &NewUser { email, name },
            )
            .await?;
        let user: V2rayUser = self.http.json(reply)?;
        let endpoint = "POST /api/users";
        check_id(&user.uuid).map_err(|flaw| {
            self.http.invalid_text(
                endpoint,
                format!("the V2Ray panel returned a user id {flaw} for the new user {email}"),
            )
        })?;
        check_name(&user.email).map_err(|flaw| {
            self.http.invalid_text(
                endpoint,
                format!(
                    "the V2Ray panel returned an email {flaw} for user {}",
                    user.uuid
                ),
            )
        })?;
        Ok(user)
    }

    /// `GET /api/users`: every user, unpaginated.
    /// Users whose uuid is not valid are left out (see [`crate::VpnClient::list_keys`]).
    pub async fn list_users(&self) -> Result<Vec<V2rayUser>> {
        let reply = self
            .http
            .call("list_users", Method::GET, &["api", "users"])
            .await?;
        let users = self.http.json(reply)?;
        Ok(text::with_valid_ids(
            self.server(),
            "GET /api/users",
            users,
            |u: &V2rayUser| &u.uuid,
        ))
    }

    /// `GET /api/keys/{uuid}/link`.
    pub async fn get_link(&self, uuid: &str) -> Result<V2rayLink> {
        self.check_id(uuid)?;
        let reply = self
            .http
            .call("get_link", Method::GET, &["api", "keys", uuid, "link"])
            .await?;
        let link: V2rayLink = self.http.json(reply)?;
        check_link(&link.link).map_err(|flaw| {
            self.http.invalid_text(
                format!("GET /api/keys/{uuid}/link"),
                format!("the V2Ray panel returned a link {flaw} for user {uuid}"),
            )
        })?;
        Ok(link)
    }

    /// `DELETE /api/users/{uuid}`: 204 or 200 is deleted, 404 already gone.
    pub async fn delete_user(&self, uuid: &str) -> Result<DeleteOutcome> {
        self.check_id(uuid)?;
        let reply = self
            .http
            .call("delete_user", Method::DELETE, &["api", "users", uuid])
            .await?;
        if reply.status == StatusCode::NOT_FOUND {
            return Ok(DeleteOutcome::AlreadyGone);
        }
        self.http.success(reply)?;
        Ok(DeleteOutcome::Deleted)
    }

    /// `GET /api/stats/users`; entries whose uuid is not valid are left out.
    pub async fn stats(&self) -> Result<V2rayStats> {
        let reply = self
            .http
            .call("stats", Method::GET, &["api", "stats", "users"])
            .await?;
        let mut stats: V2rayStats = self.http.json(reply)?;
        stats.users = text::with_valid_ids(
            self.server(),
            "GET /api/stats/users",
            stats.users,
            |u: &V2rayUserStats| &u.uuid,
        );
        Ok(stats)
    }

    /// A cheap request that says whether the panel answers and takes our API key: the link of
    /// the nil uuid, which no user has. Every other GET grows with the users (the list, the
    /// stats); this one is a lookup. 404 is the healthy answer (so is 200, from a panel that has
    /// such a user); anything else is the error its status means, classified as usual.
    pub async fn health(&self) -> Result<()> {
        let reply = self
            .http
            .call("health", Method::GET, &["api", "keys", HEALTH_UUID, "link"])
            .await?;
        if reply.status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        self.http.success(reply).map(drop)
    }

    /// Idempotent create, see [`crate::VpnClient::ensure_key`]: on a retry, or when the panel
    /// answers 409, the user with the subscription's email is adopted instead of created.
    pub async fn ensure_key(&self, sub: &SubscriptionId, is_retry: bool) -> Result<ProvisionedKey> {
        let email = owned_v2ray_email(sub);
        let existing = if is_retry {
            self.find_user(&email).await?
        } else {
            None
        };
        let (user, adopted) = match existing {
            Some(user) => (user, true),
            None => match self.create_user(&email, &owned_key_name(sub)).await {
                Ok(user) => (user, false),
                Err(Error::Conflict { server, detail }) => match self.find_user(&email).await? {
                    Some(user) => (user, true),
                    None => {
                        return Err(Error::Conflict {
                            server,
                            detail: format!("{detail}; yet no user with email {email} is listed"),
                        });
                    }
                },
                Err(e) => return Err(e),
            },
        };
        if adopted {
            tracing::info!(server = %self.server(), subscription = %sub, uuid = %user.uuid, "Adopted an existing V2Ray user");
        }
        let link = self.get_link(&user.uuid).await?.link;
        Ok(ProvisionedKey {
            server_key_id: user.uuid,
            link,
            adopted,
        })
    }

    /// Every user as a [`RemoteKey`] named by email.
    pub async fn remote_keys(&self) -> Result<Vec<RemoteKey>> {
        let users = self.list_users().await?;
        Ok(text::remote_keys(
            self.server(),
            "GET /api/users",
            users.into_iter().map(|u| (u.uuid, u.email)),
        ))
    }

    /// Uplink + downlink per user.
    pub async fn traffic(&self) -> Result<Vec<KeyTraffic>> {
        Ok(self
            .stats()
            .await?
            .users
            .into_iter()
            .map(|u| KeyTraffic {
                server_key_id: u.uuid,
                bytes: u.uplink.saturating_add(u.downlink),
            })
            .collect())
    }

    async fn find_user(&self, email: &str) -> Result<Option<V2rayUser>> {
        let users = self.list_users().await?;
        let found = oldest_with_email(&users, email);
        if let Some(user) = found {
            let count = users
                .iter()
                .filter(|u| u.email.eq_ignore_ascii_case(email))
                .count();
            if count > 1 {
                tracing::warn!(
                    server = %self.server(), email, count, adopted = %user.uuid,
                    "Several V2Ray users share one keyfleet email; adopting the oldest, reconcile removes the rest"
                );
            }
        }
        Ok(found.cloned())
    }

    fn check_id(&self, uuid: &str) -> Result<()> {
        if uuid.is_empty() {
            return Err(Error::NotFound {
                server: self.server().to_owned(),
                what: "a V2Ray user with an empty uuid".into(),
            });
        }
        Ok(())
    }
}

/// The oldest user with `email` (case-insensitive): earliest parseable `created_at`, then list order.
fn oldest_with_email<'a>(users: &'a [V2rayUser], email: &str) -> Option<&'a V2rayUser> {
    users
        .iter()
        .enumerate()
        .filter(|(_, u)| u.email.eq_ignore_ascii_case(email))
        .min_by_key(|(i, u)| {
            let created = u.created();
            (created.is_none(), created, *i)
        })
        .map(|(_, u)| u)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(uuid: &str, email: &str, created_at: Option<&str>) -> V2rayUser {
        V2rayUser {
            uuid: uuid.into(),
            email: email.into(),
            name: String::new(),
            created_at: created_at.map(Into::into),
            is_active: Some(true),
        }
    }

    #[test]
    fn adopts_the_oldest_match_case_insensitively() {
        let users = [
            user("a", "alice@example.com", Some("2020-01-01T00:00:00Z")),
            user(
                "b",
                "KF-S1@keyfleet.invalid",
                Some("2024-05-01T12:00:00+02:00"),
            ),
            user(
                "c",
                "kf-s1@keyfleet.invalid",
                Some("2024-05-01T11:00:00+00:00"),
            ),
            user("d", "kf-s1@keyfleet.invalid", None),
        ];
        assert_eq!(
            oldest_with_email(&users, "kf-s1@keyfleet.invalid")
                .unwrap()
                .uuid,
            "b"
        );
        let undated = [
            user("x", "kf-s1@keyfleet.invalid", None),
            user("y", "kf-s1@keyfleet.invalid", Some("garbage")),
        ];
        assert_eq!(
            oldest_with_email(&undated, "kf-s1@keyfleet.invalid")
                .unwrap()
                .uuid,
            "x"
        );
        assert!(oldest_with_email(&users, "kf-s2@keyfleet.invalid").is_none());
    }

    #[test]
    fn decodes_panel_json_ignoring_unknown_fields() {
        let u: V2rayUser = serde_json::from_str(
            r#"{"uuid":"u1","email":"e","name":null,"created_at":"2024-01-01T00:00:00Z","is_active":true,"flow":"x"}"#,
        )
        .unwrap();
        assert_eq!(u.uuid, "u1");
        let s: V2rayStats = serde_json::from_str(
            r#"{"users":[{"uuid":"u1","email":"e","uplink":5,"downlink":7,"x":1}],"extra":0}"#,
        )
        .unwrap();
        assert_eq!(s.users[0].uplink + s.users[0].downlink, 12);
        let l: V2rayLink =
            serde_json::from_str(r#"{"uuid":"u1","link":"vless://secret@h:1"}"#).unwrap();
        assert!(!format!("{l:?}").contains("secret"));
    }
}
