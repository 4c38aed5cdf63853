//! Test environment: a fresh database and Redis prefix per test, the fake fleet on port 0, and
//! helpers to run the real binary and real worker processes.

use std::{
    process::{Child, Command, Output},
    time::{Duration, Instant},
};

use keyfleet_fakevpn::FakeServer;
use keyfleet_queue::{Queue, QueueConfig, QueueStats, RedisMode};
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
    /// `REDIS_URL` (seed nodes, comma-separated, on a cluster) and `KEYFLEET_REDIS_MODE`.
    pub redis_url: String,
    pub redis_mode: RedisMode,
    pub prefix: String,
    pub store: Store,
    pub queue: Queue,
}

impl TestEnv {
    pub async fn new() -> Self {
        Self::on_redis(&redis_url(), RedisMode::Standalone, new_prefix()).await
    }

    /// An environment whose queue, under `prefix`, lives on this Redis (or cluster), for the
    /// test and every process it starts.
    pub async fn on_redis(redis_url: &str, redis_mode: RedisMode, prefix: String) -> Self {
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
        let mut config = QueueConfig::new(&prefix);
        config.mode = redis_mode;
        let queue = Queue::connect(redis_url, config).unwrap();
        // As a keyfleet process would on first use: fences from an epoch Postgres handed out.
        let epoch = store.next_fence_epoch().await.unwrap();
        queue.initialize(epoch).await.unwrap();
        Self {
            database,
            database_url,
            redis_url: redis_url.to_owned(),
            redis_mode,
            prefix,
            store,
            queue,
        }
    }

    /// The binary with this environment's DATABASE_URL, REDIS_URL and prefix.
    pub fn keyfleet(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyfleet"));
        cmd.env("DATABASE_URL", &self.database_url)
            .env("REDIS_URL", &self.redis_url)
            .env(
                "KEYFLEET_REDIS_MODE",
                match self.redis_mode {
                    RedisMode::Standalone => "standalone",
                    RedisMode::Cluster => "cluster",
                },
            )
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

    /// Starts a real worker process; its log goes to a file (a pipe nobody reads while it runs
    /// would block a chatty worker after 64 KiB), returned by `terminate`.
    pub fn spawn_worker(&self, concurrency: usize, extra_env: &[(&str, &str)]) -> WorkerProcess {
        chaos::spawn_logged_worker(self, concurrency, extra_env).0
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

/// A key prefix no other test uses.
pub fn new_prefix() -> String {
    format!("kftest:{}", uuid::Uuid::new_v4().simple())
}

/// A worker process, killed if the test ends without stopping it.
pub struct WorkerProcess {
    child: Option<Child>,
    log: Option<std::path::PathBuf>,
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
                let log = self
                    .log
                    .as_ref()
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .unwrap_or_default();
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

/// A TCP proxy inside the test (to Postgres or Redis). `cut` closes every proxied connection and
/// closes new ones as soon as they are accepted, until `restore`: to the worker, the service is gone.
pub struct TcpProxy {
    pub port: u16,
    state: std::sync::Arc<std::sync::Mutex<ProxyState>>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct ProxyState {
    down: bool,
    relays: Vec<tokio::task::AbortHandle>,
}

impl TcpProxy {
    pub async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = std::sync::Arc::new(std::sync::Mutex::new(ProxyState::default()));
        let shared = std::sync::Arc::clone(&state);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let mut state = shared.lock().unwrap();
                if state.down {
                    drop(client);
                    continue;
                }
                let relay = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                state.relays.retain(|r| !r.is_finished());
                state.relays.push(relay.abort_handle());
            }
        });
        Self {
            port,
            state,
            accept,
        }
    }

    pub fn cut(&self) {
        let mut state = self.state.lock().unwrap();
        state.down = true;
        for relay in state.relays.drain(..) {
            relay.abort();
        }
    }

    pub fn restore(&self) {
        self.state.lock().unwrap().down = false;
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for relay in self.state.lock().unwrap().relays.drain(..) {
            relay.abort();
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

/// Waits until `done` jobs have finished in total and nothing is ready, running or delayed (a job
/// enqueues its follow-ups before it finishes, so a drained queue has nothing more coming).
pub async fn drained(env: &TestEnv, done: u64, within: Duration) -> QueueStats {
    let stats = eventually(
        within,
        &format!("{done} jobs done and the queue drained"),
        || async {
            let s = env.queue.stats().await.ok()?;
            (s.done >= done && s.ready == 0 && s.running == 0 && s.delayed == 0).then_some(s)
        },
    )
    .await;
    assert_eq!(stats.done, done, "exactly the expected jobs ran: {stats:?}");
    assert_eq!(stats.dead, 0, "nothing dead-lettered: {stats:?}");
    stats
}

/// Helpers of the retry and resilience tests (`retries.rs`, `resilience.rs`): workers whose log
/// goes to a file, bulk seeding of key rows, the dead-letter list, a private Redis.
pub mod chaos {
    use std::{
        path::PathBuf,
        process::{Child, Command, Stdio},
        time::Duration,
    };

    use keyfleet_core::{JobPayload, ServerId};

    use super::{TestEnv, WorkerProcess, eventually};

    /// Starts a real worker process like [`TestEnv::spawn_worker`], but its log goes to a file
    /// instead of a pipe nobody reads while it runs: a chatty worker (retries, Redis outages) would
    /// otherwise block on a full pipe after 64 KiB and look hung. Returns the process and its log.
    pub fn spawn_logged_worker(
        env: &TestEnv,
        concurrency: usize,
        extra_env: &[(&str, &str)],
    ) -> (WorkerProcess, PathBuf) {
        let dir = std::env::temp_dir().join("keyfleet-e2e");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!(
            "{}-{}.log",
            env.prefix.replace(':', "_"),
            uuid::Uuid::new_v4().simple()
        ));
        let log = std::fs::File::create(&path).unwrap();
        let mut cmd = env.keyfleet();
        // For measurements only: run another build of the binary (e.g. target/release/keyfleet).
        if let Ok(bin) = std::env::var("KEYFLEET_E2E_WORKER_BIN") {
            let mut other = Command::new(bin);
            for (k, v) in cmd.get_envs() {
                if let Some(v) = v {
                    other.env(k, v);
                }
            }
            cmd = other;
        }
        cmd.args(["worker", "--concurrency", &concurrency.to_string()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let worker = WorkerProcess {
            child: Some(cmd.spawn().expect("worker starts")),
            log: Some(path.clone()),
        };
        (worker, path)
    }

    /// The last `lines` lines of a worker log, for failure messages.
    pub fn log_tail(path: &std::path::Path, lines: usize) -> String {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether the process has not exited (`try_wait` is `None`).
    pub fn still_running(worker: &mut WorkerProcess) -> bool {
        worker
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Resident set size of a process in KiB (`VmRSS` of `/proc/PID/status`).
    pub fn rss_kib(pid: u32) -> Option<u64> {
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

    pub fn pid_of(worker: &WorkerProcess) -> u32 {
        worker.child.as_ref().unwrap().id()
    }

    /// The id of a registered server.
    pub async fn server_id(env: &TestEnv, name: &str) -> ServerId {
        env.store.server_by_name(name).await.unwrap().id
    }

    /// Records `jobs` pending keys in bulk, in two SQL statements, as the producer would: job `g`
    /// (0-based) is the key of subscription `{prefix}{g / servers.len()}` on
    /// `servers[g % servers.len()]`. Returns the create payloads to enqueue, in the same order.
    pub async fn seed_pending_keys(
        env: &TestEnv,
        prefix: &str,
        jobs: usize,
        servers: &[ServerId],
    ) -> Vec<JobPayload> {
        assert!(!servers.is_empty() && jobs > 0);
        assert!(
            prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "a subscription id prefix: {prefix:?}"
        );
        let n = servers.len();
        let subs = jobs.div_ceil(n);
        let ids = servers
            .iter()
            .map(|s| s.0.to_string())
            .collect::<Vec<_>>()
            .join(",");
        env.store
            .execute_admin(&format!(
                "INSERT INTO subscriptions (id) SELECT '{prefix}' || g FROM generate_series(0, {}) g
                 ON CONFLICT DO NOTHING",
                subs - 1
            ))
            .await
            .unwrap();
        env.store
            .execute_admin(&format!(
                "INSERT INTO keys (subscription_id, server_id, state, enqueued_at)
                 SELECT '{prefix}' || (g / {n}), (ARRAY[{ids}]::bigint[])[g % {n} + 1], 'pending', now()
                 FROM generate_series(0, {}) g",
                jobs - 1
            ))
            .await
            .unwrap();
        (0..jobs)
            .map(|g| {
                JobPayload::create(
                    servers[g % n],
                    format!("{prefix}{}", g / n).parse().unwrap(),
                )
            })
            .collect()
    }

    /// `keyfleet dlq list --json`.
    pub fn dlq_list(env: &TestEnv) -> Vec<serde_json::Value> {
        let out = env.ok(&["dlq", "list", "--json"]);
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap_or_else(|e| panic!("dlq list --json is JSON ({e}): {out}"))
            .as_array()
            .expect("dlq list --json is an array")
            .clone()
    }

    /// Waits until a key is in `state` in Postgres; returns its row.
    pub async fn key_in_state(
        env: &TestEnv,
        sub: &str,
        server: ServerId,
        state: &str,
        within: Duration,
    ) -> keyfleet_store::KeyRow {
        let sub = sub.parse().unwrap();
        eventually(
            within,
            &format!("key {sub} on {server} {state}"),
            || async {
                let row = env.store.key_row(&sub, server).await.ok()??;
                (row.state == state).then_some(row)
            },
        )
        .await
    }

    /// A loopback port nobody listened on a moment ago.
    pub fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// A redis-server of this test only, on a free loopback port, keeping nothing on disk. It can be
    /// frozen (SIGSTOP) and thawed (SIGCONT); dropping it thaws and kills it.
    pub struct PrivateRedis {
        child: Child,
        pub port: u16,
    }

    impl PrivateRedis {
        pub async fn start() -> Self {
            let port = free_port();
            let child = Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server starts (is it installed?)");
            let redis = Self { child, port };
            let client = redis::Client::open(redis.url()).unwrap();
            eventually(
                Duration::from_secs(10),
                "the private redis-server to answer PING",
                || async {
                    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                    redis::cmd("PING")
                        .query_async::<String>(&mut conn)
                        .await
                        .ok()
                },
            )
            .await;
            redis
        }

        pub fn url(&self) -> String {
            format!("redis://127.0.0.1:{}", self.port)
        }

        fn pid(&self) -> nix::unistd::Pid {
            nix::unistd::Pid::from_raw(self.child.id() as i32)
        }

        /// SIGSTOP: the process stays, its data stays, it answers nothing.
        pub fn freeze(&self) {
            nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGSTOP).unwrap();
        }

        pub fn thaw(&self) {
            nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGCONT).unwrap();
        }
    }

    impl Drop for PrivateRedis {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGCONT);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// A Redis Cluster of this test only: `n` primaries on free loopback ports, the slots spread
    /// over them by `redis-cli --cluster create`, nothing on disk but each node's cluster file.
    pub struct RedisCluster {
        nodes: Vec<Child>,
        pub ports: Vec<u16>,
        dir: std::path::PathBuf,
    }

    impl RedisCluster {
        pub async fn start(n: usize) -> Self {
            let dir = std::env::temp_dir()
                .join("keyfleet-e2e")
                .join(format!("cluster-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&dir).unwrap();
            let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
            let nodes = ports
                .iter()
                .map(|port| {
                    Command::new("redis-server")
                        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                        .args(["--cluster-enabled", "yes", "--dir", dir.to_str().unwrap()])
                        .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                        .args(["--save", "", "--appendonly", "no"])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("redis-server starts (is it installed?)")
                })
                .collect();
            let cluster = Self { nodes, ports, dir };
            for port in &cluster.ports {
                eventually(
                    Duration::from_secs(10),
                    "a cluster node answering",
                    || async { cluster.cli(*port, &["PING"]).contains("PONG").then_some(()) },
                )
                .await;
            }
            let addresses: Vec<String> = cluster
                .ports
                .iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect();
            let created = Command::new("redis-cli")
                .args(["--cluster", "create"])
                .args(&addresses)
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .output()
                .expect("redis-cli runs");
            assert!(
                created.status.success(),
                "redis-cli --cluster create: {}",
                String::from_utf8_lossy(&created.stdout)
            );
            for port in &cluster.ports {
                eventually(Duration::from_secs(20), "the cluster to be ok", || async {
                    cluster
                        .cli(*port, &["CLUSTER", "INFO"])
                        .contains("cluster_state:ok")
                        .then_some(())
                })
                .await;
            }
            cluster
        }

        /// What `redis-cli -p PORT ARGS…` printed (errors included: a MOVED reply is an answer).
        pub fn cli(&self, port: u16, args: &[&str]) -> String {
            let out = Command::new("redis-cli")
                .args(["-p", &port.to_string()])
                .args(args)
                .output()
                .expect("redis-cli runs");
            String::from_utf8_lossy(&out.stdout).into_owned()
        }

        /// `REDIS_URL` naming only the first node: the client must find the others itself.
        pub fn seed_url(&self) -> String {
            format!("redis://127.0.0.1:{}", self.ports[0])
        }
    }

    impl Drop for RedisCluster {
        fn drop(&mut self) {
            for node in &mut self.nodes {
                let _ = node.kill();
                let _ = node.wait();
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Helpers of the sweep and scheduler tests (`sweeps.rs`): long-running `keyfleet` processes (a
/// worker, a scheduler replica) whose log goes to a file as JSON lines, so a chatty process never
/// blocks on a full pipe and the test can read what it logged while it runs.
pub mod sweeping {
    use std::{
        path::PathBuf,
        process::{Child, ExitStatus, Stdio},
        time::{Duration, Instant},
    };

    use super::TestEnv;

    pub struct LoggedProcess {
        child: Option<Child>,
        log: PathBuf,
        /// What it printed on stdout (a file, like its log: never a pipe nobody reads).
        stdout: PathBuf,
    }

    /// `keyfleet <args>` with the environment's database, Redis and prefix, `RUST_LOG=info` and
    /// JSON logs to a file of its own; `extra_env` goes last (it may override `DATABASE_URL`).
    pub fn spawn_logged(env: &TestEnv, args: &[&str], extra_env: &[(&str, &str)]) -> LoggedProcess {
        let dir = std::env::temp_dir().join("keyfleet-e2e");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(format!(
            "{}-{}-{}.log",
            args.first().copied().unwrap_or("keyfleet"),
            env.prefix.replace(':', "_"),
            uuid::Uuid::new_v4().simple()
        ));
        let file = std::fs::File::create(&log).unwrap();
        let stdout = log.with_extension("out");
        let stdout_file = std::fs::File::create(&stdout).unwrap();
        let mut cmd = env.keyfleet();
        // For measurements only: run workers from another build (e.g. target/release/keyfleet).
        if let (Some(&"worker"), Ok(bin)) = (args.first(), std::env::var("KEYFLEET_E2E_WORKER_BIN"))
        {
            let mut other = std::process::Command::new(bin);
            for (k, v) in cmd.get_envs() {
                if let Some(v) = v {
                    other.env(k, v);
                }
            }
            cmd = other;
        }
        cmd.args(args)
            .env("RUST_LOG", "info")
            .env("KEYFLEET_LOG_FORMAT", "json")
            .stdout(Stdio::from(stdout_file))
            .stderr(Stdio::from(file));
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        LoggedProcess {
            child: Some(cmd.spawn().expect("keyfleet starts")),
            log,
            stdout,
        }
    }

    /// A real worker process (`keyfleet worker --concurrency N`).
    pub fn spawn_worker(
        env: &TestEnv,
        concurrency: usize,
        extra_env: &[(&str, &str)],
    ) -> LoggedProcess {
        let concurrency = concurrency.to_string();
        spawn_logged(env, &["worker", "--concurrency", &concurrency], extra_env)
    }

    /// A real scheduler replica: `keyfleet scheduler` with `(sweep, cron)` pairs; sweeps not named
    /// are "off".
    pub fn spawn_scheduler(env: &TestEnv, schedules: &[(&str, &str)]) -> LoggedProcess {
        spawn_scheduler_with(env, schedules, &[], &[])
    }

    /// [`spawn_scheduler`] with more arguments (e.g. `--metrics-listen`) and environment.
    pub fn spawn_scheduler_with(
        env: &TestEnv,
        schedules: &[(&str, &str)],
        extra_args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> LoggedProcess {
        let mut args = vec!["scheduler".to_owned()];
        for sweep in ["reconcile", "expire", "configs", "traffic"] {
            let cron = schedules
                .iter()
                .find(|(s, _)| *s == sweep)
                .map_or("off", |(_, c)| *c);
            args.push(format!("--{sweep}"));
            args.push(cron.to_owned());
        }
        args.extend(extra_args.iter().map(|a| (*a).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        spawn_logged(env, &args, extra_env)
    }

    impl LoggedProcess {
        /// What it has logged so far.
        pub fn log(&self) -> String {
            std::fs::read_to_string(&self.log).unwrap_or_default()
        }

        /// The messages it logged so far, one JSON object per line (`fields.message` etc.).
        pub fn events(&self) -> Vec<serde_json::Value> {
            self.log()
                .lines()
                .filter_map(|line| serde_json::from_str(line).ok())
                .collect()
        }

        /// Waits for the line of stdout that starts with `prefix` (e.g. the address a listener
        /// bound) and returns the rest of it.
        pub fn await_stdout_line(&mut self, prefix: &str, within: Duration) -> String {
            let deadline = Instant::now() + within;
            loop {
                let out = self.stdout();
                if let Some(line) = out.lines().find_map(|l| l.strip_prefix(prefix)) {
                    return line.trim().to_owned();
                }
                assert!(
                    self.is_running() && Instant::now() < deadline,
                    "no stdout line starting {prefix:?}; stdout: {out}\nlog:\n{}",
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }

        /// What it has printed on stdout so far.
        pub fn stdout(&self) -> String {
            std::fs::read_to_string(&self.stdout).unwrap_or_default()
        }

        /// The base URL of its metrics listener (started with `--metrics-listen 127.0.0.1:0`),
        /// from the line it prints once bound: `metrics listening on http://ADDR`.
        pub fn metrics_url(&mut self, within: Duration) -> String {
            self.await_stdout_line("metrics listening on ", within)
        }

        /// Whether it has not exited.
        pub fn is_running(&mut self) -> bool {
            self.child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
        }

        /// Sends SIGTERM and waits for the exit; returns the exit status.
        pub fn terminate(&mut self, within: Duration) -> ExitStatus {
            let mut child = self.child.take().expect("still running");
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + within;
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    return status;
                }
                assert!(
                    Instant::now() < deadline,
                    "process did not exit within {within:?} of SIGTERM; its log:\n{}",
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    impl Drop for LoggedProcess {
        fn drop(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            // Kept when the test fails, for a look at the whole log.
            if !std::thread::panicking() {
                let _ = std::fs::remove_file(&self.log);
                let _ = std::fs::remove_file(&self.stdout);
            }
        }
    }
}
