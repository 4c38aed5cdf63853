use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Whether trying again can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureClass {
    /// Connect errors, timeouts, 5xx, 429: the same request may succeed later.
    Retryable {
        /// What the server asked for (`Retry-After`), if anything.
        retry_after: Option<Duration>,
    },
    /// 401, 400, a certificate pin mismatch, a response that does not parse: retrying cannot help.
    Permanent,
}

/// A failed job attempt as the queue sees it: the class decides retry or dead-letter, the message
/// is what an operator reads in the dead-letter list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub class: FailureClass,
    pub message: String,
}

impl Failure {
    pub fn retryable(message: impl Into<String>, retry_after: Option<Duration>) -> Self {
        Self {
            class: FailureClass::Retryable { retry_after },
            message: message.into(),
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            class: FailureClass::Permanent,
            message: message.into(),
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self.class, FailureClass::Retryable { .. })
    }
}
