//! The HTTP side: `/metrics`, `/healthz`, `/readyz`, as a router another axum app can mount and as
//! the listener of `--metrics-listen`.

use std::{future::Future, io::Write, net::SocketAddr};

use anyhow::Context;
use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::net::TcpListener;

use super::{Health, fleet, recorder};

/// GET /metrics (Prometheus text), GET /healthz (200 while the process runs), GET /readyz (200
/// `{"postgres":"ok","redis":"ok","claim_loop":"ok"}`, the last only in a worker; 503 naming what
/// failed; each check bounded by about a second; a worker whose claim loops have not ticked for
/// longer than ten idle polls is not ready). Installs the recorder if it is not yet.
pub fn router(health: Health) -> Router {
    recorder();
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health)
}

async fn metrics(State(health): State<Health>) -> impl IntoResponse {
    let mut text = recorder().render();
    text.push_str(&fleet::sample_and_render(&health).await);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    let readiness = health.check().await;
    let status = if readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness.to_json()))
}

/// Binds `listen`, prints exactly `metrics listening on http://<bound addr>` to stdout (flushed;
/// tests start it on 127.0.0.1:0 and read that line), serves [`router`] until `shutdown` resolves.
pub async fn serve(
    listen: SocketAddr,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = bind(listen).await?;
    serve_on(listener, health, shutdown).await
}

async fn bind(listen: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("--metrics-listen {listen}: cannot listen"))?;
    let bound = listener.local_addr()?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "metrics listening on http://{bound}")?;
    stdout.flush()?;
    tracing::info!(%bound, "Serving /metrics, /healthz and /readyz.");
    Ok(listener)
}

async fn serve_on(
    listener: TcpListener,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, router(health))
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving metrics")
}

/// How long a stopping listener waits for the requests it is answering.
const STOP_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The listener of a long-running role, running beside it until [`MetricsServer::stop`].
pub(crate) struct MetricsServer {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// With `Some(listen)`: installs the recorder, binds (an address that cannot be bound fails the
/// start-up) and serves in the background. With `None`: nothing listens.
pub(crate) async fn start(
    listen: Option<SocketAddr>,
    health: Health,
) -> anyhow::Result<Option<MetricsServer>> {
    let Some(listen) = listen else {
        return Ok(None);
    };
    recorder();
    let listener = bind(listen).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve_on(listener, health, async move {
        let _ = stopped.await;
    }));
    Ok(Some(MetricsServer { stop, task }))
}

impl MetricsServer {
    /// Stops accepting, lets the requests being answered finish, and returns.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        let finished = tokio::time::timeout(STOP_WITHIN, &mut task).await;
        let Ok(finished) = finished else {
            task.abort();
            tracing::warn!("Metrics listener still had connections open; closed them.");
            return;
        };
        match finished {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(error = format!("{error:#}"), "Metrics listener failed.")
            }
            Err(error) => tracing::warn!(%error, "Metrics listener panicked."),
        }
    }
}
