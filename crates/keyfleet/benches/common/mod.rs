//! What the benchmarks share: a Postgres database of their own.

use anyhow::{Context as _, ensure};
use keyfleet_store::Store;

/// A database `kf_bench_<uuid>` on the Postgres of `DATABASE_URL` (default
/// `postgres://postgres@127.0.0.1:5432/postgres`), which must be on 127.0.0.1; `drop` removes it.
pub struct BenchDatabase {
    pub name: String,
    pub url: String,
    /// A connection to the server's default database, for statements about the bench's.
    pub admin: Store,
}

impl BenchDatabase {
    pub async fn create() -> anyhow::Result<Self> {
        let base = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let mut url = url::Url::parse(&base).context("DATABASE_URL")?;
        ensure!(
            matches!(url.host_str(), Some("127.0.0.1" | "localhost")),
            "this benchmark only talks to Postgres on 127.0.0.1 (DATABASE_URL names {:?})",
            url.host_str()
        );
        let name = format!("kf_bench_{}", uuid::Uuid::new_v4().simple());
        url.set_path(&format!("/{name}"));
        let admin = Store::connect(&base, 1).await?;
        admin
            .execute_admin(&format!("CREATE DATABASE {name}"))
            .await?;
        Ok(Self {
            name,
            url: url.to_string(),
            admin,
        })
    }

    pub async fn drop(self) -> anyhow::Result<()> {
        self.admin
            .execute_admin(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await?;
        Ok(())
    }
}
