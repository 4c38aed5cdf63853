use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::{InvalidValue, ServerId, SubscriptionId};

/// The kinds of job, each with its own attempt budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    CreateKey,
    DeleteKey,
    SyncConfig,
    Reconcile,
    CollectTraffic,
}

impl JobKind {
    pub const ALL: [Self; 5] = [
        Self::CreateKey,
        Self::DeleteKey,
        Self::SyncConfig,
        Self::Reconcile,
        Self::CollectTraffic,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::CreateKey => "create_key",
            Self::DeleteKey => "delete_key",
            Self::SyncConfig => "sync_config",
            Self::Reconcile => "reconcile",
            Self::CollectTraffic => "collect_traffic",
        }
    }

    /// How many attempts a job of this kind gets before it is dead-lettered.
    pub const fn max_attempts(self) -> u32 {
        match self {
            Self::CreateKey | Self::DeleteKey => 8,
            Self::SyncConfig | Self::Reconcile => 5,
            // The next sweep collects again; an old reading is not worth many retries.
            Self::CollectTraffic => 3,
        }
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobKind {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| InvalidValue::new("job kind", format!("{s:?} is not a known job kind")))
    }
}

/// A per-server job as it travels through Redis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Unknown fields are ignored, not rejected: during a rolling deploy a newer producer's payloads
// (with fields this version does not know) must still run on older workers.
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobPayload {
    /// Make sure the subscription's key exists on the server and store its link. `existing`: the
    /// server already has our key under this id (found by reconcile): adopt it instead of creating.
    /// `verify`: look for our key in the server's list before creating, even on a first attempt
    /// (set by reconcile, whose view may be older than a create that just finished).
    CreateKey {
        server: ServerId,
        subscription: SubscriptionId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        existing: Option<String>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        verify: bool,
    },
    /// Make sure the key is gone from the server. `server_key_id`: which key, when known (reconcile
    /// deleting an orphan or a duplicate); otherwise Postgres or the server's list tells.
    DeleteKey {
        server: ServerId,
        subscription: SubscriptionId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        server_key_id: Option<String>,
    },
    /// Fetch the key's current link (config) and store it.
    SyncConfig {
        server: ServerId,
        subscription: SubscriptionId,
    },
    /// List the server's keys once and turn the differences with Postgres into jobs.
    Reconcile { server: ServerId },
    /// Read the server's traffic counters once and update every key's totals.
    CollectTraffic { server: ServerId },
}

impl JobPayload {
    pub fn create(server: ServerId, subscription: SubscriptionId) -> Self {
        Self::CreateKey {
            server,
            subscription,
            existing: None,
            verify: false,
        }
    }

    pub fn delete(server: ServerId, subscription: SubscriptionId) -> Self {
        Self::DeleteKey {
            server,
            subscription,
            server_key_id: None,
        }
    }

    pub fn kind(&self) -> JobKind {
        match self {
            Self::CreateKey { .. } => JobKind::CreateKey,
            Self::DeleteKey { .. } => JobKind::DeleteKey,
            Self::SyncConfig { .. } => JobKind::SyncConfig,
            Self::Reconcile { .. } => JobKind::Reconcile,
            Self::CollectTraffic { .. } => JobKind::CollectTraffic,
        }
    }

    pub fn server(&self) -> ServerId {
        match self {
            Self::CreateKey { server, .. }
            | Self::DeleteKey { server, .. }
            | Self::SyncConfig { server, .. }
            | Self::Reconcile { server }
            | Self::CollectTraffic { server } => *server,
        }
    }

    pub fn subscription(&self) -> Option<&SubscriptionId> {
        match self {
            Self::CreateKey { subscription, .. }
            | Self::DeleteKey { subscription, .. }
            | Self::SyncConfig { subscription, .. } => Some(subscription),
            Self::Reconcile { .. } | Self::CollectTraffic { .. } => None,
        }
    }

    /// The idempotency key of the logical operation: the same operation enqueued twice while the
    /// first is still pending is one job. A delete of a specific server key is its own operation
    /// (reconcile removing duplicates of one subscription).
    pub fn idempotency_key(&self) -> String {
        let kind = self.kind();
        let server = self.server();
        match self {
            Self::DeleteKey {
                subscription,
                server_key_id: Some(id),
                ..
            } => format!("{kind}:{server}:{subscription}:{id}"),
            _ => match self.subscription() {
                Some(sub) => format!("{kind}:{server}:{sub}"),
                None => format!("{kind}:{server}"),
            },
        }
    }

    /// The per-key lock of jobs that act on one key (create, delete, config sync of one
    /// subscription on one server): the queue never runs two of them at once, so each sees the
    /// newest intent Postgres holds when it starts and no two interleave on the server.
    pub fn key_lock(&self) -> Option<String> {
        self.subscription()
            .map(|sub| format!("{}:{sub}", self.server()))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a job payload always serialises")
    }

    pub fn from_json(raw: &str) -> Result<Self, InvalidValue> {
        serde_json::from_str(raw)
            .map_err(|e| InvalidValue::new("job payload", format!("{e} in {raw:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_and_rejects_garbage() {
        let p = JobPayload::create(ServerId(3), SubscriptionId::parse("s1").unwrap());
        assert_eq!(
            p.to_json(),
            r#"{"kind":"create_key","server":3,"subscription":"s1"}"#
        );
        assert_eq!(JobPayload::from_json(&p.to_json()).unwrap(), p);
        assert_eq!(p.idempotency_key(), "create_key:3:s1");
        assert_eq!(
            JobPayload::Reconcile {
                server: ServerId(3)
            }
            .idempotency_key(),
            "reconcile:3"
        );
        let err = JobPayload::from_json(r#"{"kind":"explode","server":1,"subscription":"x"}"#)
            .unwrap_err();
        assert!(err.to_string().contains("job payload"), "{err}");
        assert!(
            JobPayload::from_json(r#"{"kind":"create_key","server":1,"subscription":"a/b"}"#)
                .is_err()
        );
        assert!(
            JobPayload::from_json(r#"{"kind":"reconcile"}"#).is_err(),
            "missing server"
        );
        assert_eq!(p.key_lock().as_deref(), Some("3:s1"));
        assert_eq!(
            JobPayload::delete(ServerId(3), SubscriptionId::parse("s1").unwrap()).key_lock(),
            p.key_lock(),
            "a key's create and delete share one lock"
        );
        assert_eq!(
            JobPayload::Reconcile {
                server: ServerId(3)
            }
            .key_lock(),
            None
        );
    }

    #[test]
    fn payloads_from_a_newer_version_with_unknown_fields_still_decode() {
        let p = JobPayload::from_json(
            r#"{"kind":"create_key","server":3,"subscription":"s1","priority":"purchase","trace":{"id":1}}"#,
        )
        .unwrap();
        assert_eq!(
            p,
            JobPayload::create(ServerId(3), SubscriptionId::parse("s1").unwrap())
        );
    }
}
