use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::{InvalidValue, ServerId, SubscriptionId};

/// What a job does to one key on one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Make sure the subscription's key exists on the server and store its link.
    CreateKey,
    /// Make sure the key is gone from the server.
    DeleteKey,
    /// Fetch the key's current link (config) and store it.
    SyncConfig,
}

impl JobKind {
    pub const ALL: [Self; 3] = [Self::CreateKey, Self::DeleteKey, Self::SyncConfig];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::CreateKey => "create_key",
            Self::DeleteKey => "delete_key",
            Self::SyncConfig => "sync_config",
        }
    }

    /// How many attempts a job of this kind gets before it is dead-lettered.
    pub const fn max_attempts(self) -> u32 {
        match self {
            Self::CreateKey | Self::DeleteKey => 8,
            Self::SyncConfig => 5,
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

/// The payload of a per-server job, as it travels through Redis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobPayload {
    pub kind: JobKind,
    pub server: ServerId,
    pub subscription: SubscriptionId,
}

impl JobPayload {
    /// The idempotency key of the logical operation: the same operation enqueued twice while the
    /// first is still pending is one job.
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}:{}", self.kind, self.server, self.subscription)
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
        let p = JobPayload {
            kind: JobKind::CreateKey,
            server: ServerId(3),
            subscription: SubscriptionId::parse("s1").unwrap(),
        };
        assert_eq!(JobPayload::from_json(&p.to_json()).unwrap(), p);
        assert_eq!(p.idempotency_key(), "create_key:3:s1");
        let err = JobPayload::from_json(r#"{"kind":"explode","server":1,"subscription":"x"}"#)
            .unwrap_err();
        assert!(err.to_string().contains("job payload"), "{err}");
        assert!(
            JobPayload::from_json(r#"{"kind":"create_key","server":1,"subscription":"a/b"}"#)
                .is_err()
        );
    }
}
