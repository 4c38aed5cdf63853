//! Configuration from the environment, validated at start-up: nonsense refuses to start with a
//! message naming the variable.

use std::{path::Path, time::Duration};

use anyhow::{Context, anyhow, bail};
use keyfleet_queue::{QueueConfig, RedisMode};

#[derive(Clone)]
pub struct Settings {
    pub database_url: String,
    pub redis_url: String,
    pub redis_prefix: String,
    pub redis_mode: RedisMode,
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
            .field("redis_mode", &self.redis_mode)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// Every environment variable keyfleet reads, for deployment checks (`deploy/` is tested against
/// it). Libraries read a few more of their own: sqlx `PG*`, reqwest `HTTP(S)_PROXY`/`NO_PROXY`.
pub const ENV_VARS: &[&str] = &[
    "DATABASE_URL",
    "DATABASE_URL_FILE",
    "REDIS_URL",
    "REDIS_URL_FILE",
    "KEYFLEET_REDIS_PREFIX",
    "KEYFLEET_REDIS_MODE",
    "KEYFLEET_KEY_NAMESPACE",
    "KEYFLEET_LEASE_MS",
    "KEYFLEET_RETRY_BASE_MS",
    "KEYFLEET_RETRY_CAP_MS",
    "KEYFLEET_REQUEST_TIMEOUT_MS",
    "KEYFLEET_SHUTDOWN_GRACE_MS",
    "KEYFLEET_BREAKER_THRESHOLD",
    "KEYFLEET_BREAKER_COOLDOWN_MS",
    "KEYFLEET_BREAKER_COOLDOWN_CAP_MS",
    "KEYFLEET_DEAD_MAX_AGE_SECS",
    "KEYFLEET_DEAD_MAX_COUNT",
    "KEYFLEET_CONFIG_TTL_SECS",
    "KEYFLEET_SERVER_REFRESH_MS",
    "KEYFLEET_LOG_FORMAT",
    "RUST_LOG",
    // `keyfleet server add`.
    "KEYFLEET_SERVER_API_KEY",
    "KEYFLEET_SERVER_API_URL",
    // `keyfleet api` and the metrics endpoint of `worker` and `scheduler`.
    "KEYFLEET_API_LISTEN",
    "KEYFLEET_API_RATE_PER_SEC",
    "KEYFLEET_API_RATE_BURST",
    "KEYFLEET_IDEMPOTENCY_TTL_HOURS",
    "KEYFLEET_METRICS_LISTEN",
    // Part of the worker id (a pod's name in Kubernetes).
    "HOSTNAME",
];

/// Default of KEYFLEET_SHUTDOWN_GRACE_MS.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

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
        let (database_url, database_source) =
            secret_var(&get, "DATABASE_URL", "DATABASE_URL_FILE")?
                .unwrap_or_else(|| (DEFAULT_DATABASE_URL.into(), "DATABASE_URL"));
        let (redis_url, redis_source) = secret_var(&get, "REDIS_URL", "REDIS_URL_FILE")?
            .unwrap_or_else(|| (DEFAULT_REDIS_URL.into(), "REDIS_URL"));
        let settings = Self {
            database_url,
            redis_url,
            redis_prefix: text("KEYFLEET_REDIS_PREFIX", DEFAULT_REDIS_PREFIX),
            redis_mode: {
                let raw = text("KEYFLEET_REDIS_MODE", "standalone");
                RedisMode::parse(raw.trim()).with_context(|| {
                    format!("KEYFLEET_REDIS_MODE={raw:?}: use standalone or cluster")
                })?
            },
            lease: millis("KEYFLEET_LEASE_MS", 15_000, 100, 600_000)?,
            retry_base: millis("KEYFLEET_RETRY_BASE_MS", 500, 1, 600_000)?,
            retry_cap: millis("KEYFLEET_RETRY_CAP_MS", 60_000, 1, 3_600_000)?,
            request_timeout: millis("KEYFLEET_REQUEST_TIMEOUT_MS", 10_000, 10, 600_000)?,
            shutdown_grace: millis(
                "KEYFLEET_SHUTDOWN_GRACE_MS",
                DEFAULT_SHUTDOWN_GRACE.as_millis() as u64,
                0,
                600_000,
            )?,
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
                "{database_source} must be a postgres:// URL, got {}",
                describe_url(&settings.database_url)
            );
        }
        let redis_urls: Vec<&str> = match settings.redis_mode {
            RedisMode::Standalone => vec![settings.redis_url.as_str()],
            RedisMode::Cluster => settings.redis_url.split(',').map(str::trim).collect(),
        };
        for url in redis_urls {
            if !url.starts_with("redis://") && !url.starts_with("rediss://") {
                bail!(
                    "{redis_source} must be a redis:// URL{}, got {}",
                    if settings.redis_mode == RedisMode::Cluster {
                        " (or several, comma-separated, with KEYFLEET_REDIS_MODE=cluster)"
                    } else {
                        ""
                    },
                    describe_url(url)
                );
            }
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
        config.mode = self.redis_mode;
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

/// A secret-bearing variable: NAME, or the content of the file NAME_FILE names (how container
/// platforms mount secrets, so the value is never in a manifest, an `env` listing or a command
/// line). Returns the value and the variable it came from.
fn secret_var(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    file_var: &'static str,
) -> anyhow::Result<Option<(String, &'static str)>> {
    match (
        get(name).filter(|v| !v.is_empty()),
        get(file_var).filter(|v| !v.is_empty()),
    ) {
        (Some(_), Some(_)) => bail!("{name} and {file_var} are both set: set only one of them"),
        (Some(value), None) => Ok(Some((value, name))),
        (None, Some(path)) => Ok(Some((
            read_secret_file(file_var, Path::new(&path))?,
            file_var,
        ))),
        (None, None) => Ok(None),
    }
}

/// Reads a secret from a file, without one trailing newline (`echo` and most editors add it).
/// `what` names where the path came from (a variable or a flag); errors name it and the path,
/// never the content.
pub fn read_secret_file(what: &str, path: &Path) -> anyhow::Result<String> {
    let shown = path.display();
    let bytes =
        std::fs::read(path).map_err(|e| anyhow!("{what}: cannot read the file {shown}: {e}"))?;
    let mut text = String::from_utf8(bytes)
        .map_err(|_| anyhow!("{what}: the file {shown} is not UTF-8 text"))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.trim().is_empty() {
        bail!("{what}: the file {shown} is empty");
    }
    Ok(text)
}

/// What a rejected URL was, without any of it that could be secret: only its scheme.
fn describe_url(value: &str) -> String {
    match value.split_once("://") {
        Some((scheme, _))
            if !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
        {
            format!("a {scheme}:// URL")
        }
        _ => "a value that is not a URL (not shown)".to_owned(),
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

    /// A file in a fresh directory of its own, removed with the directory at the end of the test.
    struct TempFile {
        dir: std::path::PathBuf,
        path: std::path::PathBuf,
    }

    impl TempFile {
        fn new(content: &[u8]) -> Self {
            let dir =
                std::env::temp_dir().join(format!("kf-settings-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir(&dir).unwrap();
            let path = dir.join("secret");
            std::fs::write(&path, content).unwrap();
            Self { dir, path }
        }

        fn path(&self) -> &str {
            self.path.to_str().unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn urls_can_come_from_files_without_their_trailing_newline() {
        let db = TempFile::new(b"postgres://kf:hunter2@db:5432/kf\n");
        let redis = TempFile::new(b"redis://:hunter2@redis:6379\r\n");
        let s = with(&[
            ("DATABASE_URL_FILE", db.path()),
            ("REDIS_URL_FILE", redis.path()),
        ])
        .unwrap();
        assert_eq!(s.database_url, "postgres://kf:hunter2@db:5432/kf");
        assert_eq!(s.redis_url, "redis://:hunter2@redis:6379");
        // Only one newline goes: the rest is the file's content.
        let two = TempFile::new(b"redis://redis:6379\n\n");
        let s = with(&[("REDIS_URL_FILE", two.path())]).unwrap();
        assert_eq!(s.redis_url, "redis://redis:6379\n");
        // An empty variable counts as unset, as everywhere else.
        let s = with(&[("DATABASE_URL", ""), ("DATABASE_URL_FILE", db.path())]).unwrap();
        assert_eq!(s.database_url, "postgres://kf:hunter2@db:5432/kf");
    }

    /// Start-up is refused with a message saying each of `says`, and never the password.
    fn refused(pairs: &[(&str, &str)], says: &[&str]) {
        let err = with(pairs).unwrap_err().to_string();
        for part in says {
            assert!(err.contains(part), "{err:?} should say {part:?}");
        }
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn cluster_mode_takes_a_list_of_seed_nodes_and_checks_each() {
        let s = with(&[
            ("KEYFLEET_REDIS_MODE", "cluster"),
            (
                "REDIS_URL",
                "redis://:hunter2@a:6379, redis://:hunter2@b:6379",
            ),
        ])
        .unwrap();
        assert_eq!(s.queue_config().mode, RedisMode::Cluster);
        assert_eq!(with(&[]).unwrap().redis_mode, RedisMode::Standalone);
        refused(
            &[
                ("KEYFLEET_REDIS_MODE", "cluster"),
                (
                    "REDIS_URL",
                    "redis://:hunter2@a:6379,http://:hunter2@b:6379",
                ),
            ],
            &["REDIS_URL must be a redis:// URL (or several", "http://"],
        );
        refused(
            &[("KEYFLEET_REDIS_MODE", "sentinel")],
            &["KEYFLEET_REDIS_MODE=\"sentinel\": use standalone or cluster"],
        );
    }

    #[test]
    fn a_variable_and_its_file_variant_together_are_refused() {
        let db = TempFile::new(b"postgres://db/kf");
        refused(
            &[
                ("DATABASE_URL", "postgres://other/kf"),
                ("DATABASE_URL_FILE", db.path()),
            ],
            &["DATABASE_URL and DATABASE_URL_FILE are both set"],
        );
        refused(
            &[("REDIS_URL", "redis://r"), ("REDIS_URL_FILE", db.path())],
            &["REDIS_URL and REDIS_URL_FILE are both set"],
        );
    }

    #[test]
    fn secret_file_errors_name_the_variable_and_path_never_the_content() {
        let missing = "/nonexistent/keyfleet/database-url";
        refused(
            &[("DATABASE_URL_FILE", missing)],
            &["DATABASE_URL_FILE: cannot read the file", missing],
        );
        let dir = TempFile::new(b"");
        let dir = dir.dir.to_str().unwrap();
        refused(
            &[("REDIS_URL_FILE", dir)],
            &["REDIS_URL_FILE: cannot read the file", dir],
        );
        let empty = TempFile::new(b"\n");
        refused(
            &[("REDIS_URL_FILE", empty.path())],
            &["REDIS_URL_FILE: the file", empty.path(), "is empty"],
        );
        let binary = TempFile::new(b"postgres://kf:hunter2@db/\xff");
        refused(
            &[("DATABASE_URL_FILE", binary.path())],
            &["DATABASE_URL_FILE: the file", "is not UTF-8"],
        );
        // A file holding the wrong thing (here a bare password) is named, its content is not.
        let wrong = TempFile::new(b"hunter2:x\n");
        refused(
            &[("DATABASE_URL_FILE", wrong.path())],
            &["DATABASE_URL_FILE must be a postgres:// URL, got a value that is not a URL"],
        );
        let wrong = TempFile::new(b"http://user:hunter2@redis:6379");
        refused(
            &[("REDIS_URL_FILE", wrong.path())],
            &["REDIS_URL_FILE must be a redis:// URL, got a http:// URL"],
        );
    }

    /// ENV_VARS stays the whole list: every KEYFLEET_* name in the crates' sources (code, messages
    /// and docs alike) and in the README, and every name the code reads with `env::var` or clap's
    /// `env = ...`, is in it.
    #[test]
    fn env_vars_lists_every_variable_the_sources_name() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .canonicalize()
            .unwrap();
        let mut files = vec![root.join("README.md")];
        let mut dirs: Vec<_> = std::fs::read_dir(root.join("crates"))
            .unwrap()
            .map(|e| e.unwrap().path().join("src"))
            .collect();
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    files.push(path);
                }
            }
        }
        assert!(files.len() > 20, "found the sources: {files:?}");
        let mut missing = std::collections::BTreeSet::new();
        for file in &files {
            let text = std::fs::read_to_string(file).unwrap();
            let mut names: Vec<&str> = keyfleet_tokens(&text);
            for opener in ["env::var(\"", "env::var_os(\"", "env = \""] {
                names.extend(
                    text.split(opener)
                        .skip(1)
                        .filter_map(|rest| rest.split('"').next()),
                );
            }
            for name in names {
                if !ENV_VARS.contains(&name) {
                    missing.insert(format!("{name} ({})", file.display()));
                }
            }
        }
        assert!(missing.is_empty(), "not in settings::ENV_VARS: {missing:?}");
    }

    fn keyfleet_tokens(text: &str) -> Vec<&str> {
        let mut found = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("KEYFLEET_") {
            let before = rest[..at].chars().next_back();
            let tail = &rest[at..];
            let len = tail
                .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            let name = tail[..len].trim_end_matches('_');
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && name.len() > "KEYFLEET_".len()
            {
                found.push(name);
            }
            rest = &tail[len.max(1)..];
        }
        found
    }
}
