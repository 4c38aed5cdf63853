//! What the benchmarks share: a Postgres database of their own, and a deployment to run `keyfleet`
//! against.
#![allow(dead_code)] // each bench uses its part

use std::time::Duration;

use std::io::BufRead as _;

use anyhow::{Context as _, bail, ensure};
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

/// A keyfleet deployment for a benchmark: a database of its own (migrated), the shared Redis under
/// a prefix of its own, and the one way the benches run the release `keyfleet` binary against it.
pub struct Deployment {
    pub db: BenchDatabase,
    pub store: Store,
    /// The settings every `keyfleet` process of this deployment gets.
    pub env: Vec<(String, String)>,
    pub redis_url: String,
    pub prefix: String,
}

impl Deployment {
    pub async fn create() -> anyhow::Result<Self> {
        let redis_url =
            std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let db = BenchDatabase::create().await?;
        let store = Store::connect(&db.url, 2).await?;
        store.migrate().await?;
        let prefix = format!("kfbench:{}", db.name);
        let env = vec![
            ("DATABASE_URL".to_owned(), db.url.clone()),
            ("REDIS_URL".to_owned(), redis_url.clone()),
            ("KEYFLEET_REDIS_PREFIX".to_owned(), prefix.clone()),
            ("RUST_LOG".to_owned(), "warn".to_owned()),
            ("KEYFLEET_SERVER_REFRESH_MS".to_owned(), "200".to_owned()),
        ];
        Ok(Self {
            db,
            store,
            env,
            redis_url,
            prefix,
        })
    }

    /// `keyfleet <args>` (the release build cargo bench makes) with this deployment's settings.
    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_keyfleet"));
        command.args(args).envs(self.env.iter().cloned());
        command
    }

    /// Drops the database and the queue's keys.
    pub async fn drop(self) -> anyhow::Result<()> {
        let queue = keyfleet_queue::Queue::connect(
            &self.redis_url,
            keyfleet_queue::QueueConfig::new(self.prefix.clone()),
        )?;
        queue.purge().await?;
        self.db.drop().await
    }
}

/// User + system CPU time of a process (`"self"` or a pid), all threads, from `/proc/<p>/stat`
/// (in ticks of 10 ms, Linux's USER_HZ).
pub fn process_cpu(process: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{process}/stat")).ok()?;
    // Fields after the command name (which is in parentheses): state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((user + system) * 10))
}

/// Resident memory of process `pid`, KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// `/proc/loadavg` (1, 5, 15 minutes): how busy the shared machine was.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".to_owned(),
        |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

/// The rest of the stdout line that starts with `prefix`.
pub fn listening_on(child: &mut std::process::Child, prefix: &str) -> anyhow::Result<String> {
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        if let Some(rest) = line?.strip_prefix(prefix) {
            let url = rest.trim().to_owned();
            // Keep reading stdout so the process never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return Ok(url);
        }
    }
    bail!("the process exited before printing {prefix:?}")
}
