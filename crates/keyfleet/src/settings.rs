//! Configuration from the environment, validated at start-up: nonsense refuses to start with a
//! message naming the variable.

use std::time::Duration;

use anyhow::{Context, bail};
use keyfleet_queue::QueueConfig;

#[derive(Clone)]
pub struct Settings {
    pub database_url: String,
    pub redis_url: String,
    pub redis_prefix: String,
    /// How long a claimed job is leased without a heartbeat (KEYFLEET_LEASE_MS).
    pub lease: Duration,
    /// Retry back-off base and cap (KEYFLEET_RETRY_BASE_MS, KEYFLEET_RETRY_CAP_MS).
    pub retry_base: Duration,
    pub retry_cap: Duration,
    /// Per-request timeout towards VPN servers (KEYFLEET_REQUEST_TIMEOUT_MS).
    pub request_timeout: Duration,
    /// How long in-flight jobs may run on after SIGTERM (KEYFLEET_SHUTDOWN_GRACE_MS).
    pub shutdown_grace: Duration,
    /// Consecutive transient failures that open a server's circuit breaker
    /// (KEYFLEET_BREAKER_THRESHOLD), its first cool-down before a health probe
    /// (KEYFLEET_BREAKER_COOLDOWN_MS), doubled after each failed probe up to
    /// KEYFLEET_BREAKER_COOLDOWN_CAP_MS.
    pub breaker_threshold: u32,
    pub breaker_cooldown: Duration,
    pub breaker_cooldown_cap: Duration,
    /// Dead-set retention: dead jobs older than KEYFLEET_DEAD_MAX_AGE_SECS, or beyond the newest
    /// KEYFLEET_DEAD_MAX_COUNT, are dropped (0: no limit).
    pub dead_max_age: Option<Duration>,
    pub dead_max_count: Option<u64>,
    /// Deployment namespace of key names on the servers (KEYFLEET_KEY_NAMESPACE): deployments
    /// sharing a server (staging, production) never touch each other's keys.
    pub key_namespace: Option<String>,
    /// How old a stored link may get before the config sweep re-fetches it (KEYFLEET_CONFIG_TTL_SECS).
    pub config_ttl: Duration,
    /// How often a worker re-reads the servers' settings (credentials, limits, pauses) from
    /// Postgres (KEYFLEET_SERVER_REFRESH_MS).
    pub server_refresh: Duration,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("redis_prefix", &self.redis_prefix)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const DEFAULT_REDIS_PREFIX: &str = "keyfleet";

impl Settings {
    pub fn from_env() -> anyhow::Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let text = |name: &str, default: &str| {
            get(name)
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.into())
        };
        let millis = |name: &str, default: u64, min: u64, max: u64| -> anyhow::Result<Duration> {
            let Some(raw) = get(name).filter(|v| !v.is_empty()) else {
                return Ok(Duration::from_millis(default));
            };
            let ms: u64 = raw
                .trim()
                .parse()
                .with_context(|| format!("{name}={raw:?} is not a whole number of milliseconds"))?;
            if !(min..=max).contains(&ms) {
                bail!("{name}={ms} is out of range: use {min}..={max} milliseconds");
            }
            Ok(Duration::from_millis(ms))
        };
        let count = |name: &str, default: u32, min: u32, max: u32| -> anyhow::Result<u32> {
            let Some(raw) = get(name).filter(|v| !v.is_empty()) else {
                return Ok(default);
            };
            let n: u32 = raw
                .trim()
                .parse()
                .with_context(|| format!("{name}={raw:?} is not a whole number"))?;
            if !(min..=max).contains(&n) {
                bail!("{name}={n} is out of range: use {min}..={max}");
            }
            Ok(n)
        };
        let settings = Self {
            database_url: text("DATABASE_URL", DEFAULT_DATABASE_URL),
            redis_url: text("REDIS_URL", DEFAULT_REDIS_URL),
            redis_prefix: text("KEYFLEET_REDIS_PREFIX", DEFAULT_REDIS_PREFIX),
            lease: millis("KEYFLEET_LEASE_MS", 15_000, 100, 600_000)?,
            retry_base: millis("KEYFLEET_RETRY_BASE_MS", 500, 1, 600_000)?,
            retry_cap: millis("KEYFLEET_RETRY_CAP_MS", 60_000, 1, 3_600_000)?,
            request_timeout: millis("KEYFLEET_REQUEST_TIMEOUT_MS", 10_000, 10, 600_000)?,
            shutdown_grace: millis("KEYFLEET_SHUTDOWN_GRACE_MS", 10_000, 0, 600_000)?,
            breaker_threshold: count("KEYFLEET_BREAKER_THRESHOLD", 5, 1, 10_000)?,
            breaker_cooldown: millis("KEYFLEET_BREAKER_COOLDOWN_MS", 5_000, 10, 3_600_000)?,
            breaker_cooldown_cap: millis(
                "KEYFLEET_BREAKER_COOLDOWN_CAP_MS",
                300_000,
                10,
                86_400_000,
            )?,
            dead_max_age: match count("KEYFLEET_DEAD_MAX_AGE_SECS", 30 * 86_400, 0, 3_650 * 86_400)?
            {
                0 => None,
                secs => Some(Duration::from_secs(u64::from(secs))),
            },
            dead_max_count: match count("KEYFLEET_DEAD_MAX_COUNT", 100_000, 0, 100_000_000)? {
                0 => None,
                n => Some(u64::from(n)),
            },
            key_namespace: get("KEYFLEET_KEY_NAMESPACE").filter(|v| !v.is_empty()),
            config_ttl: Duration::from_secs(u64::from(count(
                "KEYFLEET_CONFIG_TTL_SECS",
                86_400,
                1,
                31_536_000,
            )?)),
            server_refresh: millis("KEYFLEET_SERVER_REFRESH_MS", 2_000, 50, 600_000)?,
        };
        if !settings.database_url.starts_with("postgres://")
            && !settings.database_url.starts_with("postgresql://")
        {
            bail!(
                "DATABASE_URL must be a postgres:// URL, got {:?}",
                redact(&settings.database_url)
            );
        }
        if !settings.redis_url.starts_with("redis://")
            && !settings.redis_url.starts_with("rediss://")
        {
            bail!(
                "REDIS_URL must be a redis:// URL, got {:?}",
                redact(&settings.redis_url)
            );
        }
        if settings.breaker_cooldown_cap < settings.breaker_cooldown {
            bail!(
                "KEYFLEET_BREAKER_COOLDOWN_CAP_MS={} is below KEYFLEET_BREAKER_COOLDOWN_MS={}",
                settings.breaker_cooldown_cap.as_millis(),
                settings.breaker_cooldown.as_millis()
            );
        }
        Ok(settings)
    }

    /// Applies the process-wide parts of the settings (the key namespace). Call once at start-up.
    pub fn apply_process_wide(&self) -> anyhow::Result<()> {
        if let Some(namespace) = &self.key_namespace {
            keyfleet_core::set_key_namespace(namespace)?;
        }
        Ok(())
    }

    pub fn queue_config(&self) -> QueueConfig {
        let mut config = QueueConfig::new(&self.redis_prefix);
        config.lease = self.lease;
        config.breaker_threshold = self.breaker_threshold;
        config.breaker_cooldown = self.breaker_cooldown;
        config.breaker_cooldown_cap = self.breaker_cooldown_cap;
        config.dead_max_age = self.dead_max_age;
        config.dead_max_count = self.dead_max_count;
        config
    }

    pub async fn store(&self) -> anyhow::Result<keyfleet_store::Store> {
        Ok(keyfleet_store::Store::connect(&self.database_url, 16).await?)
    }

    pub fn queue(&self) -> anyhow::Result<keyfleet_queue::Queue> {
        Ok(keyfleet_queue::Queue::connect(
            &self.redis_url,
            self.queue_config(),
        )?)
    }
}

fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&str, &str)]) -> anyhow::Result<Settings> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn defaults_and_rejections_name_the_variable() {
        let s = with(&[]).unwrap();
        assert_eq!(s.redis_prefix, "keyfleet");
        assert_eq!(s.lease, Duration::from_secs(15));
        assert!(
            s.shutdown_grace < s.lease,
            "a job claimed while draining is released before its lease expires"
        );
        let err = with(&[("KEYFLEET_LEASE_MS", "soon")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("KEYFLEET_LEASE_MS"), "{err}");
        let err = with(&[("DATABASE_URL", "mysql://u:secret@h/db")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("DATABASE_URL") && !err.contains("secret"),
            "{err}"
        );
    }
}
