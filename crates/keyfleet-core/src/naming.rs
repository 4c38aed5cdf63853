//! Deterministic names of the keys keyfleet creates.
//!
//! A retry of a create whose response was lost must find the key the first attempt made, and the
//! reconcile sweep must tell keyfleet's keys from users created by hand. Both work by name: every
//! key keyfleet creates is named from its subscription id alone, with a prefix no human uses.
//!
//! Deployments that share servers (staging and production) set a namespace: their names are
//! `kf-<namespace>.<sub>`. A subscription id never contains a dot, so no deployment reads another's
//! names as its own (`kf-staging.x` is not a valid subscription to the default deployment, and a
//! namespaced one only reads names behind its own `kf-<namespace>.`): none deletes another's keys.

use std::sync::OnceLock;

use crate::{InvalidValue, SubscriptionId};

/// Prefix of every name, email and Outline id keyfleet gives a key.
pub const OWNED_PREFIX: &str = "kf-";
const V2RAY_EMAIL_DOMAIN: &str = "@keyfleet.invalid";

static NAMESPACE_PREFIX: OnceLock<String> = OnceLock::new();

/// Sets this process's deployment namespace (`KEYFLEET_KEY_NAMESPACE`), once, before any key is
/// named: 1-32 of `a-z 0-9 _ -`. Setting it again to another value is an error.
pub fn set_key_namespace(namespace: &str) -> Result<(), InvalidValue> {
    let valid = !namespace.is_empty()
        && namespace.len() <= 32
        && namespace
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !valid {
        return Err(InvalidValue::new(
            "KEYFLEET_KEY_NAMESPACE",
            format!("{namespace:?}: use 1-32 of a-z, 0-9, '_' and '-'"),
        ));
    }
    let prefix = format!("{OWNED_PREFIX}{namespace}.");
    if NAMESPACE_PREFIX.get_or_init(|| prefix.clone()) != &prefix {
        return Err(InvalidValue::new(
            "KEYFLEET_KEY_NAMESPACE",
            "already set to another namespace in this process",
        ));
    }
    Ok(())
}

/// The prefix of this deployment's names: `kf-`, or `kf-<namespace>.`.
pub fn owned_prefix() -> &'static str {
    NAMESPACE_PREFIX.get().map_or(OWNED_PREFIX, String::as_str)
}

/// Name of the key on either kind of server (V2Ray user name, Outline key name).
pub fn owned_key_name(sub: &SubscriptionId) -> String {
    format!("{}{sub}", owned_prefix())
}

/// The V2Ray user email: lowercase and deterministic, because Xray compares emails
/// case-insensitively and a retry looks the user up by it.
pub fn owned_v2ray_email(sub: &SubscriptionId) -> String {
    format!("{}{sub}{V2RAY_EMAIL_DOMAIN}", owned_prefix())
}

/// The email of the marker user keyfleet keeps on a gRPC node (Xray/V2Ray) to notice a restart,
/// which forgets every user added over the API. `~` is in no subscription id, so the marker is
/// never read as a subscription's key.
pub fn owned_marker_email() -> String {
    format!("{}~marker{V2RAY_EMAIL_DOMAIN}", owned_prefix())
}

/// The id keyfleet chooses for an Outline key (`PUT /access-keys/{id}`, Outline >= 1.8).
pub fn owned_outline_key_id(sub: &SubscriptionId) -> String {
    owned_key_name(sub)
}

/// The subscription a keyfleet-owned name, email or Outline id belongs to; `None` for anything
/// keyfleet did not create.
pub fn subscription_of_owned_name(name: &str) -> Option<SubscriptionId> {
    let lower = name.to_ascii_lowercase();
    let rest = lower.strip_prefix(owned_prefix())?;
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
        assert_eq!(subscription_of_owned_name(&owned_marker_email()), None);
    }

    #[test]
    fn the_default_deployment_never_reads_a_namespaced_name_as_its_own() {
        // The default (no namespace) is what this test process uses; a namespaced deployment's
        // names carry a dot, which no subscription id has.
        assert_eq!(subscription_of_owned_name("kf-staging.sub_7"), None);
        assert_eq!(
            subscription_of_owned_name("kf-staging.sub_7@keyfleet.invalid"),
            None
        );
        assert!(set_key_namespace("Bad.Name").is_err());
        assert!(set_key_namespace("").is_err());
    }
}
