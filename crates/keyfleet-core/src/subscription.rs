use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::InvalidValue;

/// A subscription's id as the purchase service knows it.
///
/// Ids are case-insensitive and stored lowercase, because they end up inside V2Ray emails, which
/// Xray compares case-insensitively: `ABC` and `abc` must never become two users.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SubscriptionId(String);

impl SubscriptionId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        let id = raw.trim().to_ascii_lowercase();
        if id.is_empty() {
            return Err(InvalidValue::new("subscription id", "it is empty"));
        }
        if id.len() > Self::MAX_LEN {
            return Err(InvalidValue::new(
                "subscription id",
                format!("{raw:?} is longer than {} characters", Self::MAX_LEN),
            ));
        }
        if let Some(bad) = id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(InvalidValue::new(
                "subscription id",
                format!("{raw:?} contains {bad:?}; allowed are letters, digits, '-' and '_'"),
            ));
        }
        Ok(Self(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SubscriptionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for SubscriptionId {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for SubscriptionId {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<SubscriptionId> for String {
    fn from(id: SubscriptionId) -> Self {
        id.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_case_and_rejects_bad_characters() {
        assert_eq!(
            SubscriptionId::parse(" Sub-42 ").unwrap().as_str(),
            "sub-42"
        );
        assert!(SubscriptionId::parse("").is_err());
        assert!(
            SubscriptionId::parse("a/b")
                .unwrap_err()
                .reason
                .contains("'/'")
        );
        assert!(SubscriptionId::parse(&"x".repeat(65)).is_err());
    }
}
