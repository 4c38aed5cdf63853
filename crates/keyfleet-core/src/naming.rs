//! Deterministic names of the keys keyfleet creates.
//!
//! A retry of a create whose response was lost must find the key the first attempt made, and the
//! reconcile sweep must tell keyfleet's keys from users created by hand. Both work by name: every
//! key keyfleet creates is named from its subscription id alone, with a prefix no human uses.

use crate::SubscriptionId;

/// Prefix of every name, email and Outline id keyfleet gives a key.
pub const OWNED_PREFIX: &str = "kf-";
const V2RAY_EMAIL_DOMAIN: &str = "@keyfleet.invalid";

/// Name of the key on either kind of server (V2Ray user name, Outline key name).
pub fn owned_key_name(sub: &SubscriptionId) -> String {
    format!("{OWNED_PREFIX}{sub}")
}

/// The V2Ray user email: lowercase and deterministic, because Xray compares emails
/// case-insensitively and a retry looks the user up by it.
pub fn owned_v2ray_email(sub: &SubscriptionId) -> String {
    format!("{OWNED_PREFIX}{sub}{V2RAY_EMAIL_DOMAIN}")
}

/// The id keyfleet chooses for an Outline key (`PUT /access-keys/{id}`, Outline >= 1.8).
pub fn owned_outline_key_id(sub: &SubscriptionId) -> String {
    owned_key_name(sub)
}

/// The subscription a keyfleet-owned name, email or Outline id belongs to; `None` for anything
/// keyfleet did not create.
pub fn subscription_of_owned_name(name: &str) -> Option<SubscriptionId> {
    let lower = name.to_ascii_lowercase();
    let rest = lower.strip_prefix(OWNED_PREFIX)?;
    let rest = rest.strip_suffix(V2RAY_EMAIL_DOMAIN).unwrap_or(rest);
    SubscriptionId::parse(rest).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_foreign_names_are_not_ours() {
        let sub = SubscriptionId::parse("Sub_7").unwrap();
        assert_eq!(owned_v2ray_email(&sub), "kf-sub_7@keyfleet.invalid");
        assert_eq!(
            subscription_of_owned_name(&owned_v2ray_email(&sub)),
            Some(sub.clone())
        );
        assert_eq!(subscription_of_owned_name(&owned_key_name(&sub)), Some(sub));
        assert_eq!(subscription_of_owned_name("alice@example.com"), None);
        assert_eq!(subscription_of_owned_name("kf-"), None);
    }
}
