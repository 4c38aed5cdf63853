//! Test environment: a fresh database and Redis prefix per test, the fake fleet on port 0, and
//! helpers to run the real binary and real worker processes.

use std::{
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use keyfleet_fakevpn::FakeServer;
use keyfleet_queue::{Queue, QueueConfig};
use keyfleet_store::Store;

pub fn base_database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub struct TestEnv {
    pub database: String,
    pub database_url: String,
    pub prefix: String,
    pub store: Store,
    pub queue: Queue,
}

impl TestEnv {
    pub async fn new() -> Self {
        let database = format!("kf_test_{}", uuid::Uuid::new_v4().simple());
        let admin = Store::connect(&base_database_url(), 1)
            .await
            .expect("Postgres is reachable (DATABASE_URL)");
        admin
            .execute_admin(&format!("CREATE DATABASE {database}"))
            .await
            .unwrap();
        let mut url = url::Url::parse(&base_database_url()).unwrap();
        url.set_path(&format!("/{database}"));
        let database_url = url.to_string();
        let store = Store::connect(&database_url, 4).await.unwrap();
        store.migrate().await.unwrap();
        let prefix = format!("kftest:{}", uuid::Uuid::new_v4().simple());
        let queue = Queue::connect(&redis_url(), QueueConfig::new(&prefix)).unwrap();
        Self {
            database,
            database_url,
            prefix,
            store,
            queue,
        }
    }

    /// The binary with this environment's DATABASE_URL, REDIS_URL and prefix.
    pub fn keyfleet(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyfleet"));
        cmd.env("DATABASE_URL", &self.database_url)
            .env("REDIS_URL", redis_url())
            .env("KEYFLEET_REDIS_PREFIX", &self.prefix)
            .env("RUST_LOG", "warn");
        cmd
    }

    /// Runs the binary to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.keyfleet()
            .args(args)
            .output()
            .expect("the keyfleet binary runs")
    }

    /// Runs the binary and insists it succeeded; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "keyfleet {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Registers a fake server through the CLI, as an operator would.
    pub fn add_server(&self, name: &str, fake: &FakeServer, max_in_flight: u32) {
        let limit = max_in_flight.to_string();
        let url = fake.api_url();
        let mut args = vec![
            "server",
            "add",
            "--name",
            name,
            "--kind",
            fake.kind().as_str(),
            "--api-url",
            &url,
        ];
        let key = fake.api_key();
        let cert = fake.cert_sha256();
        if let Some(key) = &key {
            args.extend(["--api-key", key]);
        }
        if let Some(cert) = &cert {
            args.extend(["--cert-sha256", cert]);
        }
        args.extend(["--max-in-flight", &limit]);
        self.ok(&args);
    }

    /// Starts a real worker process.
    pub fn spawn_worker(&self, concurrency: usize, extra_env: &[(&str, &str)]) -> WorkerProcess {
        let mut cmd = self.keyfleet();
        cmd.args(["worker", "--concurrency", &concurrency.to_string()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        WorkerProcess {
            child: Some(cmd.spawn().expect("worker starts")),
        }
    }

    pub async fn cleanup(self) {
        self.queue.purge().await.unwrap();
        self.store.pool().close().await;
        let admin = Store::connect(&base_database_url(), 1).await.unwrap();
        admin
            .execute_admin(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.database
            ))
            .await
            .unwrap();
    }
}

/// A worker process, killed if the test ends without stopping it.
pub struct WorkerProcess {
    child: Option<Child>,
}

impl WorkerProcess {
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), signal).unwrap();
    }

    /// Sends SIGTERM and waits for the exit; returns the exit status and what it logged.
    pub fn terminate(mut self, within: Duration) -> (std::process::ExitStatus, String) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut log = String::new();
                if let Some(mut err) = child.stderr.take() {
                    use std::io::Read;
                    let _ = err.read_to_string(&mut log);
                }
                return (status, log);
            }
            assert!(
                Instant::now() < deadline,
                "worker did not exit within {within:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `check` until it returns `Some`, failing the test after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
