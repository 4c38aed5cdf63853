//! Bearer tokens with a role, and the per-token rate limit.
//!
//! A token is `kf_` and 64 hex digits (256 random bits); Postgres keeps only its SHA-256, which is
//! enough for a secret of that entropy (no password hashing needed: nothing to brute-force).

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{extract::FromRequestParts, http::request::Parts};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock};
use parking_lot::Mutex;
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::{
    AppState,
    error::{ApiError, ApiResult},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// The purchase service: provision, deprovision and read its own subscriptions.
    Producer,
    /// Everything.
    Admin,
    /// Reads everything an admin can, changes nothing (the dashboard's read-only role).
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Producer => "producer",
            Self::Admin => "admin",
            Self::Viewer => "viewer",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "producer" => Some(Self::Producer),
            "admin" => Some(Self::Admin),
            "viewer" => Some(Self::Viewer),
            _ => None,
        }
    }
}

/// A new token and the digest to store.
pub fn new_token() -> (String, [u8; 32]) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = format!("kf_{}", hex::encode(bytes));
    let digest = digest(&token);
    (token, digest)
}

pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Who is calling, as proven by their token.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// Admin only.
    pub fn admin(&self) -> ApiResult<()> {
        self.allow(&[Role::Admin])
    }

    /// Admin or viewer: operators' reads.
    pub fn operator(&self) -> ApiResult<()> {
        self.allow(&[Role::Admin, Role::Viewer])
    }

    pub fn allow(&self, roles: &[Role]) -> ApiResult<()> {
        if roles.contains(&self.role) {
            Ok(())
        } else {
            let wanted: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            Err(ApiError::forbidden(format!(
                "a {} token cannot do this; it needs the role {}",
                self.role.as_str(),
                wanted.join(" or ")
            )))
        }
    }
}

/// Per-token request budget, and when each token's `last_used_at` was last written.
pub struct Gate {
    limiter: DefaultKeyedRateLimiter<i64>,
    touched: Mutex<HashMap<i64, Instant>>,
}

/// How often a token's `last_used_at` is written at most.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

impl Gate {
    pub fn new(per_second: NonZeroU32, burst: NonZeroU32) -> Arc<Self> {
        Arc::new(Self {
            limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            touched: Mutex::default(),
        })
    }

    fn check(&self, token: i64) -> ApiResult<()> {
        self.limiter.check_key(&token).map_err(|not_until| {
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            ApiError::RateLimited {
                retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
            }
        })
    }

    fn should_touch(&self, token: i64) -> bool {
        let mut touched = self.touched.lock();
        let now = Instant::now();
        match touched.get(&token) {
            Some(at) if now.duration_since(*at) < TOUCH_EVERY => false,
            _ => {
                touched.insert(token, now);
                true
            }
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token>"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header must be \"Bearer <token>\"")
            })?;
        let owner = state
            .store
            .token_owner(&digest(token))
            .await?
            .ok_or_else(|| ApiError::unauthorized("unknown or revoked token"))?;
        let role = Role::parse(&owner.role).ok_or_else(|| {
            ApiError::Internal(anyhow::anyhow!(
                "token {} has role {:?}",
                owner.id,
                owner.role
            ))
        })?;
        state.gate.check(owner.id)?;
        if state.gate.should_touch(owner.id) {
            let store = state.store.clone();
            tokio::spawn(async move {
                if let Err(e) = store.touch_token(owner.id).await {
                    tracing::debug!("recording a token's last use: {e}");
                }
            });
        }
        Ok(Self {
            name: owner.name,
            role,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_only_their_digest_is_kept() {
        let (a, da) = new_token();
        let (b, db) = new_token();
        assert_ne!(a, b);
        assert!(a.starts_with("kf_") && a.len() == 67);
        assert_eq!(digest(&a), da);
        assert_ne!(da, db);
    }

    #[test]
    fn the_gate_refuses_past_the_burst_with_a_retry_after() {
        let gate = Gate::new(NonZeroU32::new(1).unwrap(), NonZeroU32::new(2).unwrap());
        assert!(gate.check(1).is_ok());
        assert!(gate.check(1).is_ok());
        match gate.check(1) {
            Err(ApiError::RateLimited { retry_after_secs }) => assert!(retry_after_secs >= 1),
            other => panic!("expected a rate limit, got {other:?}"),
        }
        assert!(gate.check(2).is_ok(), "budgets are per token");
    }
}
