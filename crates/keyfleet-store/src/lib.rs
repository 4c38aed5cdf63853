//! Postgres access for keyfleet: migrations, servers, subscriptions, keys and the batched
//! write-back of job results.
//!
//! Invariant: Postgres is the source of truth for intent. Every write that records a job's result
//! is fenced (`keys.fence <= attempt's fence`), so a stale attempt can never overwrite a newer one.

mod intent;
mod keys;
mod servers;
mod subscriptions;
mod sweeps;
mod tokens;
mod writeback;

use std::time::Duration;

use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

pub use intent::DeleteIntent;
pub use keys::{KeyRow, KeyStatus, KeyWrite, LatencyStats, ServerKeyCount, WriteOutcome};
pub use servers::{NewServer, Server, ServerChange};
pub use subscriptions::{KeyDetail, ProvisionPlan, StoredReceipt, SubscriptionKeys};
pub use sweeps::{StoredKey, SweepTick, TickFindings, TrafficKind, TrafficOutcome};
pub use tokens::{ApiToken, TokenOwner};
pub use writeback::{
    Contributors, WRITEBACK_BATCH_ROWS_METRIC, WRITEBACK_COMMIT_METRIC, WriteBack, WriteBackConfig,
};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid DATABASE_URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot connect to Postgres at {target}: {source}")]
    Connect { target: String, source: sqlx::Error },
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Rejected(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("write-back is shut down")]
    WriteBackClosed,
    #[error("Postgres error: {0}")]
    Db(#[from] sqlx::Error),
}

impl Error {
    /// Whether the operation may succeed if tried again: Postgres unreachable, the connection lost
    /// or the pool exhausted, or a database error whose SQLSTATE says the same statement can pass
    /// later (see [`sqlstate_is_transient`]). Everything else the database rejects (constraint
    /// violations, data exceptions such as a NUL byte in text, ...) is permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::WriteBackClosed => true,
            Self::Connect { source, .. } | Self::Db(source) => sqlx_is_transient(source),
            _ => false,
        }
    }
}

fn sqlx_is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| sqlstate_is_transient(&code)),
        // Decoding, configuration, missing rows or columns: retrying runs the same code again.
        _ => false,
    }
}

/// Whether a Postgres SQLSTATE names a condition that passes with time: serialization failure
/// (40001), deadlock (40P01), a read-only transaction after a failover (25006), the server shutting
/// down or starting (57P01, 57P02, 57P03), insufficient resources (53xxx), connection exceptions
/// (08xxx), a lock not available (55P03).
pub fn sqlstate_is_transient(code: &str) -> bool {
    matches!(
        code,
        "40001" | "40P01" | "25006" | "57P01" | "57P02" | "57P03" | "55P03"
    ) || code.starts_with("53")
        || code.starts_with("08")
}

/// The handle to keyfleet's Postgres database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Connects with a pool of `max_connections`; a malformed URL or an unreachable server is an error
    /// that names the target without its password.
    pub async fn connect(database_url: &str, max_connections: u32) -> Result<Self> {
        let options: PgConnectOptions =
            database_url
                .parse()
                .map_err(|e: sqlx::Error| Error::BadUrl {
                    url: redact_password(database_url),
                    reason: e.to_string(),
                })?;
        let target = format!(
            "{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("(default database)")
        );
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            // No ping before each use: it doubled the round trips of every query, which a
            // purchase pays several times over when Postgres is across a network. A connection
            // that died while idle fails its one query with a transient error (the write-back
            // retries it, the API answers 503 with Retry-After) and leaves the pool.
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(|source| Error::Connect { target, source })?;
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// One round trip (`SELECT 1`): whether Postgres answers, for readiness checks.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Applies the migrations in `migrations/` (embedded at build time).
    pub async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("../../migrations").run(&self.pool).await?;
        Ok(())
    }
}

fn redact_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// Turns a unique or check violation into a message an operator can act on.
fn constraint_error(e: sqlx::Error, what: &str) -> Error {
    if let Some(db) = e.as_database_error() {
        if db.is_unique_violation() {
            return Error::Conflict(format!("{what} already exists"));
        }
        if db.is_check_violation() || db.is_foreign_key_violation() {
            return Error::Rejected(format!(
                "{what} rejected by the database ({}): {}",
                db.constraint().unwrap_or("constraint"),
                db.message()
            ));
        }
    }
    Error::Db(e)
}

impl Store {
    /// Runs one statement that takes no parameters (database administration: CREATE/DROP DATABASE).
    pub async fn execute_admin(&self, sql: &str) -> Result<()> {
        sqlx::raw_sql(sql).execute(&self.pool).await?;
        Ok(())
    }
}

/// A transaction that holds transaction-scoped locks (released at commit, rollback or disconnect).
pub type Transaction = sqlx::Transaction<'static, sqlx::Postgres>;

/// Takes a named transaction-scoped advisory lock if free; false if someone else holds it.
pub async fn try_advisory_xact_lock(tx: &mut Transaction, name: &str) -> Result<bool> {
    use sqlx::Row;
    let row = sqlx::query("SELECT pg_try_advisory_xact_lock(hashtext($1))")
        .bind(name)
        .fetch_one(&mut **tx)
        .await?;
    Ok(row.try_get(0)?)
}
