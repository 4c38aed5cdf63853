//! Domain types of keyfleet: servers, subscriptions, jobs and the classification of failures.
//!
//! Invariant: this crate does no I/O. Everything here is plain data and pure functions, so every
//! other crate can agree on names, identities and error classes without depending on each other.

mod failure;
mod job;
mod naming;
mod server;
mod subscription;

pub use failure::{Failure, FailureClass};
pub use job::{JobKind, JobPayload};
pub use naming::{
    OWNED_PREFIX, owned_key_name, owned_marker_email, owned_outline_key_id, owned_prefix,
    owned_v2ray_email, set_key_namespace, subscription_of_owned_name,
};
pub use server::{ServerId, ServerKind};
pub use subscription::SubscriptionId;

/// A value that failed validation, with what was wrong and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what}: {reason}")]
pub struct InvalidValue {
    pub what: &'static str,
    pub reason: String,
}

impl InvalidValue {
    pub fn new(what: &'static str, reason: impl Into<String>) -> Self {
        Self {
            what,
            reason: reason.into(),
        }
    }
}
