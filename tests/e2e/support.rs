//! Helpers of the delivery-guarantee tests (`guarantees.rs`): worker processes whose log is drained
//! as it comes, registering and provisioning in bulk, waiting for Postgres and the queue, and a
//! minimal Redis client to read the queue's keys directly.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt};
use keyfleet::producer::{Producer, ProvisionReceipt};
use keyfleet_core::{ServerId, SubscriptionId};
use keyfleet_fakevpn::{FakeFleet, FakeServer};
use keyfleet_queue::{JobId, QueueStats};
use nix::{sys::signal::Signal, unistd::Pid};

use crate::harness::{TestEnv, eventually, redis_url};

/// A real worker process whose stderr is read as it comes (a worker that logs more than a pipe
/// buffer never blocks on it), killed if the test ends without stopping it.
pub struct Worker {
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    drain: Option<JoinHandle<()>>,
}

impl Worker {
    /// `keyfleet worker --concurrency N` with the environment's database, Redis and prefix.
    pub fn spawn(env: &TestEnv, concurrency: usize, extra_env: &[(&str, &str)]) -> Self {
        let mut cmd = env.keyfleet();
        cmd.args(["worker", "--concurrency", &concurrency.to_string()])
            .env("RUST_LOG", "info")
            // Plain text: the log ends up in assertion messages, not on a terminal.
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("worker starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&log);
        let drain = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Self {
            child: Some(child),
            log,
            drain: Some(drain),
        }
    }

    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(self.child.as_ref().unwrap().id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// SIGKILL, then reaps the process.
    pub fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM, then waits for the exit without blocking the test's runtime (the in-process fake
    /// servers keep answering what the worker finishes); returns the exit status and the log.
    pub async fn terminate(mut self, within: Duration) -> (ExitStatus, String) {
        self.signal(Signal::SIGTERM);
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                if let Some(drain) = self.drain.take() {
                    let _ = drain.join();
                }
                return (status, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "worker did not exit within {within:?} of SIGTERM; its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What the worker has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `n` subscription ids `<tag>-0`, `<tag>-1`, ...
pub fn subscriptions(tag: &str, n: usize) -> Vec<SubscriptionId> {
    (0..n)
        .map(|i| SubscriptionId::parse(&format!("{tag}-{i}")).unwrap())
        .collect()
}

/// [`TestEnv::add_server`] (through the CLI, as an operator would), returning the server's id.
pub async fn register(env: &TestEnv, name: &str, fake: &FakeServer, limit: u32) -> ServerId {
    env.add_server(name, fake, limit);
    env.store.server_by_name(name).await.unwrap().id
}

/// Registers every server of `fleet` as `<prefix>-<i>` with the limit `limit(i)`; returns their
/// ids in fleet order.
pub async fn register_fleet(
    env: &TestEnv,
    prefix: &str,
    fleet: &FakeFleet,
    limit: impl Fn(usize) -> u32,
) -> Vec<ServerId> {
    let mut ids = Vec::with_capacity(fleet.servers.len());
    for (i, fake) in fleet.servers.iter().enumerate() {
        ids.push(register(env, &format!("{prefix}-{i}"), fake, limit(i)).await);
    }
    ids
}

/// Provisions subscriptions through the library's producer (what the purchase service calls), a
/// few at a time, instead of one CLI process each.
pub async fn provision_many(env: &TestEnv, subs: &[SubscriptionId]) -> Vec<ProvisionReceipt> {
    let producer = Producer::new(env.store.clone(), env.queue.clone());
    futures::stream::iter(subs)
        .map(|sub| producer.provision(sub, None))
        .buffered(4)
        .try_collect()
        .await
        .expect("provisioning is accepted")
}

pub async fn active_keys(env: &TestEnv) -> i64 {
    env.store.count_keys_in_state("active").await.unwrap()
}

/// Waits until `n` keys are active in Postgres.
pub async fn wait_for_active(env: &TestEnv, n: i64, within: Duration) {
    eventually(within, &format!("{n} active keys"), || async {
        (active_keys(env).await == n).then_some(())
    })
    .await;
}

/// Waits until `done` jobs are acknowledged and nothing is ready, running or delayed; returns the
/// queue's counts.
pub async fn wait_for_queue_done(env: &TestEnv, done: u64, within: Duration) -> QueueStats {
    let deadline = Instant::now() + within;
    loop {
        let stats = env.queue.stats().await.unwrap();
        if stats.done >= done && stats.ready + stats.running + stats.delayed == 0 {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {done} jobs done and nothing queued: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A field of a job's hash in Redis (`None` once the job is done and deleted).
pub fn job_field(env: &TestEnv, job: JobId, field: &str) -> Option<String> {
    redis_command(&["HGET", &env.queue.redis_key(&format!("job:{job}")), field]).into_text()
}

/// The ids in a server's ready list.
pub fn ready_jobs(env: &TestEnv, server: ServerId) -> Vec<JobId> {
    let key = env.queue.redis_key(&format!("ready:{}", server.0));
    redis_command(&["LRANGE", &key, "0", "-1"])
        .into_array()
        .into_iter()
        .map(|id| JobId(id.into_text().unwrap().parse().unwrap()))
        .collect()
}

/// A Redis reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Nil,
    Int(i64),
    Text(String),
    Error(String),
    Array(Vec<Resp>),
}

impl Resp {
    pub fn into_text(self) -> Option<String> {
        match self {
            Self::Text(t) => Some(t),
            Self::Int(n) => Some(n.to_string()),
            Self::Nil => None,
            other => panic!("expected a string reply, got {other:?}"),
        }
    }

    pub fn into_array(self) -> Vec<Resp> {
        match self {
            Self::Array(items) => items,
            Self::Nil => vec![],
            other => panic!("expected an array reply, got {other:?}"),
        }
    }
}

/// Sends one command to REDIS_URL (host, port, password and database taken from it) and reads
/// the reply: a minimal client, so the test reads the queue's keys without going through it.
pub fn redis_command(args: &[&str]) -> Resp {
    let url = url::Url::parse(&redis_url()).unwrap();
    let host = url.host_str().unwrap_or("127.0.0.1").to_owned();
    let port = url.port().unwrap_or(6379);
    let stream = std::net::TcpStream::connect((host.as_str(), port)).expect("Redis is reachable");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut send = |args: &[&str]| {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend(format!("${}\r\n", a.len()).into_bytes());
            out.extend(a.as_bytes());
            out.extend(b"\r\n");
        }
        writer.write_all(&out).unwrap();
        read_resp(&mut reader)
    };
    if let Some(password) = url.password() {
        let reply = match url.username() {
            "" => send(&["AUTH", password]),
            user => send(&["AUTH", user, password]),
        };
        assert!(!matches!(reply, Resp::Error(_)), "Redis AUTH: {reply:?}");
    }
    let db = url.path().trim_start_matches('/');
    if !db.is_empty() && db != "0" {
        let reply = send(&["SELECT", db]);
        assert!(!matches!(reply, Resp::Error(_)), "Redis SELECT: {reply:?}");
    }
    send(args)
}

fn read_resp(reader: &mut impl BufRead) -> Resp {
    let mut line = String::new();
    reader.read_line(&mut line).expect("a Redis reply");
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at(1);
    let len = || rest.parse::<i64>().unwrap();
    match kind {
        "+" => Resp::Text(rest.to_owned()),
        "-" => Resp::Error(rest.to_owned()),
        ":" => Resp::Int(len()),
        "$" if len() < 0 => Resp::Nil,
        "$" => {
            let mut buf = vec![0; len() as usize + 2];
            reader.read_exact(&mut buf).unwrap();
            buf.truncate(len() as usize);
            Resp::Text(String::from_utf8(buf).unwrap())
        }
        "*" if len() < 0 => Resp::Nil,
        "*" => Resp::Array((0..len()).map(|_| read_resp(reader)).collect()),
        other => panic!("unexpected Redis reply type {other:?} in {line:?}"),
    }
}
