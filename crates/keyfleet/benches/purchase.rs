//! Purchase latency through the HTTP API: what the customer waits for.
//!
//! One purchase at a time on 10 V2Ray + 1 Outline fake servers with a fixed latency per request
//! (50 ms, then 0 ms), through real processes: `keyfleet api` and one `keyfleet worker
//! --concurrency 44` (limit 4 per server), both the release build cargo bench makes. Each round,
//! interleaved so the noise of a shared machine hits all alike:
//! - **floor**: the same purchase made directly by this process, `VpnClient::ensure_key` on the 11
//!   servers at once (create, then link, per V2Ray server): the requests a purchase cannot avoid,
//!   so 2·RTT plus the fakes' and the client's own cost;
//! - **purchase**: `POST /v1/subscriptions/{id}/provision?wait_ms=10000`, timed until its 200
//!   (every key active and committed in Postgres, which the bench then checks);
//! - **call**: the same call with `wait_ms=0`, timed until its 202 (the receipt); the bench then
//!   waits for the keys in Postgres before the next round.
//!
//! Reported per latency: p50 / p99 / max of each, and the purchase's overhead over the floor.
//! Run: `cargo bench -p keyfleet --bench purchase` (part of `just bench`). Needs Postgres and Redis
//! on 127.0.0.1 (`DATABASE_URL`, `REDIS_URL`); makes a database `kf_bench_<uuid>` per latency and
//! drops it. `KF_BENCH_PURCHASES` (default 100) sets the rounds per latency.

mod common;

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use keyfleet_core::SubscriptionId;
use keyfleet_fakevpn::{FakeFleet, FakeServerConfig, Latency};
use keyfleet_vpn::{ClientConfig, ServerEndpoint, VpnClient};
use serde_json::{Value, json};

use crate::common::{Deployment, listening_on};

const V2RAY: usize = 10;
const OUTLINE: usize = 1;
const KEYS: usize = V2RAY + OUTLINE;

fn main() -> anyhow::Result<()> {
    let rounds: usize = match std::env::var("KF_BENCH_PURCHASES") {
        Ok(v) => v.parse().context("KF_BENCH_PURCHASES")?,
        Err(_) => 100,
    };
    ensure!(rounds > 0, "KF_BENCH_PURCHASES must be at least 1");
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        println!(
            "Purchase latency through the API: {V2RAY} V2Ray + {OUTLINE} Outline fake servers, one purchase at a time, {rounds} rounds per latency; `keyfleet api` + one `keyfleet worker --concurrency 44`, limit 4 per server (release build)"
        );
        for rtt in [Duration::from_millis(50), Duration::ZERO] {
            let report = measure(rtt, rounds).await?;
            report.print(rtt);
        }
        Ok(())
    })
}

/// Milliseconds of each round, by what was timed.
#[derive(Default)]
struct Report {
    floor: Vec<f64>,
    purchase: Vec<f64>,
    call: Vec<f64>,
}

impl Report {
    fn print(mut self, rtt: Duration) {
        let rtt_ms = rtt.as_secs_f64() * 1e3;
        println!("\nRTT {rtt_ms:.0} ms (2·RTT = {:.0} ms), ms:", 2.0 * rtt_ms);
        println!("| what | p50 | p99 | max |");
        println!("|---|---:|---:|---:|");
        let floor = Stats::of(&mut self.floor);
        let purchase = Stats::of(&mut self.purchase);
        let call = Stats::of(&mut self.call);
        for (name, s) in [
            ("floor: the 11 keys made directly (ensure_key × 11)", &floor),
            (
                "purchase: provision?wait_ms → 200, keys in Postgres",
                &purchase,
            ),
            ("call: provision?wait_ms=0 → 202", &call),
        ] {
            println!("| {name} | {:.1} | {:.1} | {:.1} |", s.p50, s.p99, s.max);
        }
        println!(
            "| purchase − floor | {:.1} | {:.1} | {:.1} |",
            purchase.p50 - floor.p50,
            purchase.p99 - floor.p99,
            purchase.max - floor.max
        );
        println!(
            "| purchase − 2·RTT | {:.1} | {:.1} | {:.1} |",
            purchase.p50 - 2.0 * rtt_ms,
            purchase.p99 - 2.0 * rtt_ms,
            purchase.max - 2.0 * rtt_ms
        );
    }
}

struct Stats {
    p50: f64,
    p99: f64,
    max: f64,
}

impl Stats {
    fn of(values: &mut [f64]) -> Self {
        values.sort_by(f64::total_cmp);
        let at =
            |q: f64| values[((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
        Self {
            p50: at(0.5),
            p99: at(0.99),
            max: values[values.len() - 1],
        }
    }
}

async fn measure(rtt: Duration, rounds: usize) -> anyhow::Result<Report> {
    let latency = if rtt.is_zero() {
        Latency::Zero
    } else {
        Latency::Fixed(rtt)
    };
    let fleet = FakeFleet::start(V2RAY, OUTLINE, |kind, i| {
        FakeServerConfig::new(kind)
            .with_seed(i as u64)
            .with_latency(latency.clone())
    })
    .await?;
    let stack = Stack::start().await?;
    let outcome = rounds_on(&stack, &fleet, rounds).await;
    stack.stop().await?;
    outcome
}

async fn rounds_on(stack: &Stack, fleet: &FakeFleet, rounds: usize) -> anyhow::Result<Report> {
    let admin = stack.token("admin")?;
    let producer = stack.token("producer")?;
    let http = reqwest::Client::new();
    let mut direct = Vec::new();
    for (i, fake) in fleet.servers.iter().enumerate() {
        let name = format!("s{i}");
        let response = http
            .post(format!("{}/v1/servers", stack.api))
            .bearer_auth(&admin)
            .json(&json!({
                "name": name,
                "kind": fake.kind().as_str(),
                "api_url": fake.api_url(),
                "api_key": fake.api_key(),
                "cert_sha256": fake.cert_sha256(),
                "max_in_flight": 4,
            }))
            .send()
            .await?;
        ensure!(
            response.status().is_success(),
            "adding server {name}: {}",
            response.text().await?
        );
        direct.push(VpnClient::new(
            &ServerEndpoint {
                name,
                kind: fake.kind(),
                api_url: fake.api_url().parse()?,
                api_key: fake.api_key(),
                cert_sha256: fake.cert_sha256(),
                grpc: None,
                key_secret: None,
            },
            &ClientConfig::default(),
        )?);
    }
    // The worker picks the servers up on its next refresh; a first purchase warms every pool.
    stack.purchase(&http, &producer, "warm", 30_000).await?;

    let mut report = Report::default();
    for round in 0..rounds {
        let sub = SubscriptionId::parse(&format!("floor{round}"))?;
        let started = Instant::now();
        futures::future::try_join_all(direct.iter().map(|c| c.ensure_key(&sub, false))).await?;
        report.floor.push(ms(started));

        let started = Instant::now();
        stack
            .purchase(&http, &producer, &format!("waited{round}"), 10_000)
            .await?;
        report.purchase.push(ms(started));
        stack.check_committed(&format!("waited{round}")).await?;

        let sub = format!("called{round}");
        let started = Instant::now();
        let (status, _) = stack.provision(&http, &producer, &sub, 0).await?;
        report.call.push(ms(started));
        ensure!(status == 202 || status == 200, "provision {sub}: {status}");
        stack.await_committed(&sub).await?;
    }
    Ok(report)
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// A deployment of its own, `keyfleet api` and one `keyfleet worker`.
struct Stack {
    deployment: Deployment,
    api: String,
    processes: Vec<Child>,
}

impl Stack {
    async fn start() -> anyhow::Result<Self> {
        let mut stack = Self {
            deployment: Deployment::create().await?,
            api: String::new(),
            processes: Vec::new(),
        };
        let mut api = stack.spawn(&["api", "--listen", "127.0.0.1:0"])?;
        stack.api = listening_on(&mut api, "keyfleet api listening on ")?;
        stack.processes.push(api);
        let worker = stack.spawn(&["worker", "--concurrency", "44"])?;
        stack.processes.push(worker);
        Ok(stack)
    }

    fn command(&self, args: &[&str]) -> Command {
        self.deployment.command(args)
    }

    fn spawn(&self, args: &[&str]) -> anyhow::Result<Child> {
        Ok(self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?)
    }

    /// A new token of `role`: the last line `keyfleet token create` prints.
    fn token(&self, role: &str) -> anyhow::Result<String> {
        let name = format!("bench-{role}");
        let out = self
            .command(&["token", "create", "--name", &name, "--role", role])
            .output()?;
        ensure!(
            out.status.success(),
            "token create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout)?;
        Ok(stdout
            .lines()
            .last()
            .context("no token printed")?
            .trim()
            .to_owned())
    }

    async fn provision(
        &self,
        http: &reqwest::Client,
        token: &str,
        sub: &str,
        wait_ms: u64,
    ) -> anyhow::Result<(u16, Value)> {
        let response = http
            .post(format!(
                "{}/v1/subscriptions/{sub}/provision?wait_ms={wait_ms}",
                self.api
            ))
            .bearer_auth(token)
            .json(&json!({}))
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await?))
    }

    /// A purchase that must complete within the wait with a link on every server.
    async fn purchase(
        &self,
        http: &reqwest::Client,
        token: &str,
        sub: &str,
        wait_ms: u64,
    ) -> anyhow::Result<()> {
        let (status, body) = self.provision(http, token, sub, wait_ms).await?;
        ensure!(status == 200, "purchase {sub}: {status} {body}");
        let links = body["keys"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|k| k["link"].as_str().is_some_and(|l| !l.is_empty()))
            .count();
        ensure!(links == KEYS, "purchase {sub}: {links} links, want {KEYS}");
        Ok(())
    }

    async fn active_keys(&self, sub: &str) -> anyhow::Result<usize> {
        let keys = self
            .deployment
            .store
            .subscription_keys(&SubscriptionId::parse(sub)?)
            .await?;
        Ok(keys.keys.iter().filter(|k| k.state == "active").count())
    }

    async fn check_committed(&self, sub: &str) -> anyhow::Result<()> {
        let active = self.active_keys(sub).await?;
        ensure!(
            active == KEYS,
            "{sub}: {active} keys active in Postgres, want {KEYS}"
        );
        Ok(())
    }

    async fn await_committed(&self, sub: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.active_keys(sub).await? < KEYS {
            if Instant::now() > deadline {
                bail!("{sub}: its keys were not active within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        for process in &mut self.processes {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(process.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        for process in &mut self.processes {
            let _ = process.wait();
        }
        self.deployment.drop().await
    }
}
