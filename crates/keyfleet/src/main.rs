use std::process::ExitCode;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, parser::ValueSource};
use keyfleet::{
    api, demo, dlq,
    producer::Producer,
    recovery,
    schedule::Schedule,
    scheduler::Scheduler,
    servers::{secret_on_command_line_warning, server_secret, validate_new_server},
    settings::Settings,
    sweeps, telemetry,
    worker::{self, WorkerOptions},
};
use keyfleet_core::SubscriptionId;

/// keyfleet: provisions VPN access keys across a fleet of V2Ray and Outline servers through a
/// durable Redis job queue, with Postgres as the source of truth.
///
/// Configuration: DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres),
/// REDIS_URL (default redis://127.0.0.1:6379), KEYFLEET_REDIS_PREFIX (default "keyfleet").
#[derive(Parser)]
#[command(name = "keyfleet", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the database migrations.
    Migrate,
    /// Register and inspect VPN servers.
    #[command(subcommand)]
    Server(ServerCommand),
    /// Create or renew a subscription: record it and enqueue one create job per active server.
    Provision {
        /// The subscription's id (letters, digits, '-', '_'; case-insensitive).
        #[arg(long)]
        subscription: String,
        /// When the subscription expires (RFC 3339, e.g. 2027-01-31T00:00:00Z).
        #[arg(long)]
        expires_at: Option<String>,
        /// Print the receipt as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a subscription: delete its key on every server.
    Deprovision {
        #[arg(long)]
        subscription: String,
        #[arg(long)]
        json: bool,
    },
    /// Run one sweep now (what the scheduler does on its schedule) and print what it enqueued.
    Sweep {
        #[arg(value_enum)]
        sweep: sweeps::Sweep,
        /// Only this server.
        #[arg(long)]
        server: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Fire the sweeps on their cron schedules (6 fields, with seconds; "off" disables one).
    /// Any number of replicas fire each tick once.
    Scheduler {
        #[arg(long, default_value = "0 */10 * * * *")]
        reconcile: String,
        #[arg(long, default_value = "0 * * * * *")]
        expire: String,
        #[arg(long, default_value = "0 0 * * * *")]
        configs: String,
        #[arg(long, default_value = "0 */5 * * * *")]
        traffic: String,
        /// Serve /metrics, /healthz and /readyz on this address (e.g. 0.0.0.0:9090).
        #[arg(long, env = "KEYFLEET_METRICS_LISTEN")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// Run a worker: claim jobs, execute them against the servers, write results back.
    Worker {
        /// Jobs run at once by this process.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Serve /metrics, /healthz and /readyz on this address (e.g. 0.0.0.0:9090).
        #[arg(long, env = "KEYFLEET_METRICS_LISTEN")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// Show a subscription's keys, per server.
    Status {
        #[arg(long)]
        subscription: String,
        /// Print JSON (per server: state, server-side id, link present, config_synced_at, last error).
        #[arg(long)]
        json: bool,
    },
    /// Inspect, replay and purge dead-lettered jobs.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Re-derive every outstanding operation from Postgres into Redis (pending creates, keys being
    /// deleted, stale links) under a new fence epoch. Workers and the scheduler do this by
    /// themselves when they find Redis without keyfleet's state; this is for any other doubt
    /// (e.g. Redis restored from an old snapshot). Safe at any time: queued work is not doubled.
    Recover {
        #[arg(long)]
        json: bool,
    },
    /// Serve the HTTP API (JSON under /v1, OpenAPI at /v1/openapi.json).
    Api {
        /// Address to listen on (port 0 picks a free one; the bound address is printed).
        #[arg(long, env = "KEYFLEET_API_LISTEN", default_value = "0.0.0.0:8080")]
        listen: std::net::SocketAddr,
        /// Requests per second each token may make, and the burst above that.
        #[arg(long, env = "KEYFLEET_API_RATE_PER_SEC", default_value_t = std::num::NonZeroU32::new(100).unwrap())]
        rate_per_sec: std::num::NonZeroU32,
        #[arg(long, env = "KEYFLEET_API_RATE_BURST", default_value_t = std::num::NonZeroU32::new(400).unwrap())]
        rate_burst: std::num::NonZeroU32,
        /// How long a provision receipt answers repeats of its Idempotency-Key.
        #[arg(long, env = "KEYFLEET_IDEMPOTENCY_TTL_HOURS", default_value_t = 24)]
        idempotency_ttl_hours: u64,
    },
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Run the whole system on an embedded fake fleet (10 V2Ray + 1 Outline) and print a summary.
    Demo(demo::DemoOptions),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token; it is printed once, as the last line of stdout (only its SHA-256 is kept).
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        role: api::auth::Role,
    },
    /// List tokens (never the tokens themselves).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke every live token with this name (or this id).
    Revoke { name: String },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead jobs, newest first, with the reason each died.
    List {
        #[arg(long)]
        json: bool,
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Give dead jobs fresh attempts.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["id", "server", "all"])))]
    Replay {
        /// A dead job's id (repeatable).
        #[arg(long)]
        id: Vec<u64>,
        /// Every dead job of this server.
        #[arg(long)]
        server: Option<String>,
        /// Every dead job.
        #[arg(long)]
        all: bool,
    },
    /// Delete dead jobs for good (their keys keep the failure in Postgres). Workers also drop
    /// dead jobs past KEYFLEET_DEAD_MAX_AGE_SECS / KEYFLEET_DEAD_MAX_COUNT by themselves.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["id", "server", "older_than_hours", "all"])))]
    Purge {
        /// A dead job's id (repeatable).
        #[arg(long)]
        id: Vec<u64>,
        /// Every dead job of this server.
        #[arg(long)]
        server: Option<String>,
        /// Every dead job that died more than this many hours ago.
        #[arg(long)]
        older_than_hours: Option<u64>,
        /// Every dead job.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum ServerCommand {
    /// Register a server.
    Add {
        #[arg(long)]
        name: String,
        /// v2ray, outline or xray-grpc (an Xray-core/V2Ray node's own gRPC API: give
        /// --inbound-tag and the --link-* parameters).
        #[arg(long)]
        kind: String,
        /// Panel URL (v2ray) or the apiUrl with its secret prefix (outline; prefer
        /// --api-url-file or the variable: a command line is visible to every local user).
        #[arg(long, env = "KEYFLEET_SERVER_API_URL", hide_env_values = true)]
        api_url: Option<String>,
        /// A file holding the --api-url (one trailing newline is ignored).
        #[arg(long, value_name = "PATH")]
        api_url_file: Option<std::path::PathBuf>,
        /// X-API-Key of a v2ray panel (prefer --api-key-file or the variable).
        #[arg(long, env = "KEYFLEET_SERVER_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// A file holding the --api-key (one trailing newline is ignored).
        #[arg(long, value_name = "PATH")]
        api_key_file: Option<std::path::PathBuf>,
        /// certSha256 of an outline server (64 hex digits).
        #[arg(long)]
        cert_sha256: Option<String>,
        /// Most requests the whole fleet of workers may have in flight to this server.
        #[arg(long, default_value_t = 4)]
        max_in_flight: u32,
        #[command(flatten)]
        grpc: Box<keyfleet::servers::GrpcInput>,
    },
    /// List servers.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Change a server's fleet-wide in-flight limit at run time.
    SetLimit { name: String, max_in_flight: u32 },
    /// Mark every link on a server as changed (e.g. after a Reality key rotation): the next config
    /// sweep re-fetches exactly that server's links.
    BumpConfig { name: String },
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    warn_of_secrets_on_command_line(&matches);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let default_level = if matches!(cli.command, Command::Worker { .. }) {
        "info"
    } else {
        "warn"
    };
    telemetry::init(default_level);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Long-running roles take SIGTERM/SIGINT as "shut down gracefully"; other commands keep the
    // default (Ctrl-C ends them).
    let long_running = matches!(
        cli.command,
        Command::Worker { .. } | Command::Scheduler { .. } | Command::Api { .. }
    ) || matches!(&cli.command, Command::Demo(o) if o.serve);
    let shutdown = long_running.then(shutdown_signal);
    let settings = Settings::from_env()?;
    settings.apply_process_wide()?;
    match cli.command {
        Command::Migrate => {
            settings.store().await?.migrate().await?;
            println!("migrations applied");
        }
        Command::Server(command) => server(settings, command).await?,
        Command::Provision {
            subscription,
            expires_at,
            json,
        } => {
            let sub = SubscriptionId::parse(&subscription)
                .map_err(|e| anyhow::anyhow!("--subscription: {e}"))?;
            let expires_at = expires_at
                .map(|raw| {
                    DateTime::parse_from_rfc3339(&raw)
                        .map(|t| t.with_timezone(&Utc))
                        .with_context(|| format!("--expires-at {raw:?} is not an RFC 3339 time"))
                })
                .transpose()?;
            let producer = Producer::new(settings.store().await?, settings.queue()?);
            let receipt = producer.provision(&sub, expires_at).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&receipt)?);
            } else {
                let new = receipt.jobs.iter().filter(|j| j.new).count();
                println!(
                    "subscription {}: {} create jobs enqueued ({} new, {} already queued), {} keys already active",
                    receipt.subscription,
                    receipt.jobs.len(),
                    new,
                    receipt.jobs.len() - new,
                    receipt.already_active.len()
                );
            }
        }
        Command::Deprovision { subscription, json } => {
            let sub = SubscriptionId::parse(&subscription)
                .map_err(|e| anyhow::anyhow!("--subscription: {e}"))?;
            let producer = Producer::new(settings.store().await?, settings.queue()?);
            let receipt = producer.deprovision(&sub).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&receipt)?);
            } else {
                println!(
                    "subscription {}: {} delete jobs enqueued, {} pending jobs cancelled",
                    receipt.subscription,
                    receipt.jobs.len(),
                    receipt.cancelled
                );
            }
        }
        Command::Sweep {
            sweep,
            server,
            json,
        } => {
            let store = settings.store().await?;
            let queue = settings.queue()?;
            let report = sweeps::run(
                &store,
                &queue,
                sweep,
                server.as_deref(),
                settings.config_ttl,
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "sweep {}: {} jobs ({} new, {} already queued), {} pending jobs cancelled",
                    sweep.name(),
                    report.jobs.values().sum::<usize>(),
                    report.enqueued,
                    report.jobs.values().sum::<usize>() - report.enqueued,
                    report.cancelled
                );
                for (server, n) in &report.jobs {
                    println!("  {server:<20} {n}");
                }
            }
        }
        Command::Scheduler {
            reconcile,
            expire,
            configs,
            traffic,
            metrics_listen,
        } => {
            let mut schedules = Vec::new();
            for (sweep, expr) in [
                (sweeps::Sweep::Reconcile, reconcile),
                (sweeps::Sweep::Expire, expire),
                (sweeps::Sweep::Configs, configs),
                (sweeps::Sweep::Traffic, traffic),
            ] {
                if expr != "off" {
                    schedules.push((
                        sweep,
                        Schedule::parse(&format!("--{}", sweep.name()), &expr)?,
                    ));
                }
            }
            let scheduler = Scheduler {
                store: settings.store().await?,
                queue: settings.queue()?,
                id: WorkerOptions::new(1).worker_id,
                settings,
                schedules,
                metrics_listen,
            };
            scheduler
                .run(shutdown.expect("installed for the scheduler"))
                .await?;
        }
        Command::Worker {
            concurrency,
            metrics_listen,
        } => {
            worker::run(
                settings,
                WorkerOptions {
                    metrics_listen,
                    ..WorkerOptions::new(concurrency)
                },
                shutdown.expect("installed for the worker"),
            )
            .await?;
        }
        Command::Status { subscription, json } => {
            let sub = SubscriptionId::parse(&subscription)
                .map_err(|e| anyhow::anyhow!("--subscription: {e}"))?;
            let keys = settings.store().await?.subscription_status(&sub).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                println!(
                    "{:<20} {:<8} {:<9} {:<40} {:<5} {:<27} error",
                    "server", "kind", "state", "server key id", "link", "config synced at"
                );
                for k in keys {
                    println!(
                        "{:<20} {:<8} {:<9} {:<40} {:<5} {:<27} {}",
                        k.server,
                        k.kind,
                        k.state,
                        k.server_key_id.unwrap_or_default(),
                        if k.link_present { "yes" } else { "no" },
                        k.config_synced_at
                            .map(|t| t.to_rfc3339())
                            .unwrap_or_default(),
                        k.last_error.unwrap_or_default()
                    );
                }
            }
        }
        Command::Dlq(command) => dlq_command(settings, command).await?,
        Command::Recover { json } => {
            let report =
                recovery::force(&settings.store().await?, &settings.queue()?, &settings).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "fence epoch {}: {} creates, {} deletes, {} config syncs outstanding ({} newly enqueued)",
                    report.epoch,
                    report.creates,
                    report.deletes,
                    report.config_syncs,
                    report.enqueued
                );
            }
        }
        Command::Api {
            listen,
            rate_per_sec,
            rate_burst,
            idempotency_ttl_hours,
        } => {
            anyhow::ensure!(
                (1..=24 * 365).contains(&idempotency_ttl_hours),
                "--idempotency-ttl-hours {idempotency_ttl_hours} is out of range: use 1..=8760"
            );
            let options = api::ApiOptions {
                rate_per_second: rate_per_sec,
                rate_burst,
                receipt_ttl: std::time::Duration::from_secs(idempotency_ttl_hours * 3600),
            };
            api::serve(
                settings,
                options,
                listen,
                shutdown.expect("installed for the api"),
            )
            .await?;
        }
        Command::Token(command) => token_command(settings, command).await?,
        Command::Demo(options) => demo::run(settings, options, shutdown).await?,
    }
    Ok(())
}

async fn token_command(settings: Settings, command: TokenCommand) -> anyhow::Result<()> {
    let store = settings.store().await?;
    match command {
        TokenCommand::Create { name, role } => {
            let (token, digest) = api::auth::new_token();
            let created = store.create_token(&name, role.as_str(), &digest).await?;
            println!(
                "token {} (id {}, role {}) created; it is shown only now:",
                created.name, created.id, created.role
            );
            println!("{token}");
        }
        TokenCommand::List { json } => {
            let tokens = store.list_tokens().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tokens)?);
            } else {
                println!(
                    "{:<6} {:<24} {:<9} {:<26} {:<26} revoked",
                    "id", "name", "role", "created", "last used"
                );
                for t in tokens {
                    let at = |t: Option<chrono::DateTime<Utc>>| {
                        t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                            .unwrap_or_default()
                    };
                    println!(
                        "{:<6} {:<24} {:<9} {:<26} {:<26} {}",
                        t.id,
                        t.name,
                        t.role,
                        at(Some(t.created_at)),
                        at(t.last_used_at),
                        at(t.revoked_at)
                    );
                }
            }
        }
        TokenCommand::Revoke { name } => {
            let n = store.revoke_token(&name).await?;
            println!("revoked {n} token(s) named {name:?}");
        }
    }
    Ok(())
}

async fn server(settings: Settings, command: ServerCommand) -> anyhow::Result<()> {
    let store = settings.store().await?;
    match command {
        ServerCommand::Add {
            name,
            kind,
            api_url,
            api_url_file,
            api_key,
            api_key_file,
            cert_sha256,
            max_in_flight,
            grpc,
        } => {
            let api_url = server_secret(
                "--api-url",
                "KEYFLEET_SERVER_API_URL",
                api_url,
                api_url_file.as_deref(),
            )?
            .context("--api-url-file, KEYFLEET_SERVER_API_URL or --api-url is required")?;
            let api_key = server_secret(
                "--api-key",
                "KEYFLEET_SERVER_API_KEY",
                api_key,
                api_key_file.as_deref(),
            )?;
            let new = validate_new_server(
                &name,
                &kind,
                &api_url,
                api_key.as_deref(),
                cert_sha256.as_deref(),
                max_in_flight,
                Some(grpc.as_ref()),
            )?;
            let server = store.add_server(&new).await?;
            settings
                .queue()?
                .set_limits(&[(server.id, max_in_flight)])
                .await?;
            println!("server {} added with id {}", server.name, server.id);
        }
        ServerCommand::List { json } => {
            let servers = store.list_servers().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&servers)?);
            } else {
                println!(
                    "{:<6} {:<20} {:<10} {:<14} active",
                    "id", "name", "kind", "max-in-flight"
                );
                for s in servers {
                    println!(
                        "{:<6} {:<20} {:<10} {:<14} {}",
                        s.id, s.name, s.kind, s.max_in_flight, s.active
                    );
                }
            }
        }
        ServerCommand::BumpConfig { name } => {
            let generation = store.bump_config_generation(&name).await?;
            println!(
                "server {name} is at config generation {generation}: its links will be re-fetched"
            );
        }
        ServerCommand::SetLimit {
            name,
            max_in_flight,
        } => {
            anyhow::ensure!(
                (1..=1000).contains(&max_in_flight),
                "max-in-flight {max_in_flight} is out of range: use 1..=1000"
            );
            let server = store.set_server_limit(&name, max_in_flight as i32).await?;
            settings
                .queue()?
                .set_limits(&[(server.id, max_in_flight)])
                .await?;
            println!(
                "server {} now allows {} requests in flight",
                server.name, max_in_flight
            );
        }
    }
    Ok(())
}

/// `server add --api-key` (and an Outline `--api-url`, whose path is its secret) still work on
/// the command line, with a warning.
fn warn_of_secrets_on_command_line(matches: &clap::ArgMatches) {
    let Some(("server", server)) = matches.subcommand() else {
        return;
    };
    let Some(("add", add)) = server.subcommand() else {
        return;
    };
    let outline = add
        .get_one::<String>("kind")
        .is_some_and(|k| k.eq_ignore_ascii_case("outline"));
    let on_argv = |id| add.value_source(id) == Some(ValueSource::CommandLine);
    if on_argv("api_key") {
        eprintln!(
            "{}",
            secret_on_command_line_warning("--api-key", "KEYFLEET_SERVER_API_KEY")
        );
    }
    if outline && on_argv("api_url") {
        eprintln!(
            "{}",
            secret_on_command_line_warning("--api-url", "KEYFLEET_SERVER_API_URL")
        );
    }
}

async fn dlq_command(settings: Settings, command: DlqCommand) -> anyhow::Result<()> {
    let store = settings.store().await?;
    let queue = settings.queue()?;
    match command {
        DlqCommand::List { json, limit } => {
            let dead = dlq::list(&store, &queue, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&dead)?);
            } else {
                println!(
                    "{:<10} {:<16} {:<12} {:>8}  error",
                    "job", "server", "kind", "attempts"
                );
                for d in dead {
                    let server = d.server_name.unwrap_or_else(|| d.job.server.to_string());
                    println!(
                        "{:<10} {:<16} {:<12} {:>8}  {}",
                        d.job.id, server, d.job.kind, d.job.attempts, d.job.error
                    );
                }
            }
        }
        DlqCommand::Replay { id, server, all } => {
            let selection = if all {
                dlq::Selection::All
            } else if let Some(server) = server {
                dlq::Selection::Server(server)
            } else {
                dlq::Selection::Ids(id.into_iter().map(keyfleet_queue::JobId).collect())
            };
            let report = dlq::replay(&store, &queue, selection).await?;
            println!(
                "replayed {}, superseded by a live job {}, not dead {}",
                report.replayed.len(),
                report.superseded.len(),
                report.not_dead.len()
            );
            anyhow::ensure!(
                report.not_dead.is_empty(),
                "not in the dead set: {:?}",
                report.not_dead
            );
        }
        DlqCommand::Purge {
            id,
            server,
            older_than_hours,
            all,
        } => {
            let selection = if all {
                dlq::Selection::All
            } else if let Some(server) = server {
                dlq::Selection::Server(server)
            } else if let Some(hours) = older_than_hours {
                dlq::Selection::OlderThan(std::time::Duration::from_secs(hours * 3600))
            } else {
                dlq::Selection::Ids(id.into_iter().map(keyfleet_queue::JobId).collect())
            };
            let purged = dlq::purge(&store, &queue, selection).await?;
            println!("purged {} dead jobs", purged.len());
        }
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, not when the
/// future is first polled: a signal during start-up (connecting, loading servers) is not lost and
/// does not kill the process with the default action.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}
