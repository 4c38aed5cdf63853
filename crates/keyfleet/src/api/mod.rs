//! `keyfleet api`: the HTTP API the purchase service and operators call. JSON over HTTP under
//! `/v1`, bearer tokens with roles, a per-token rate limit, and an OpenAPI 3.1 document generated
//! from the handlers (`/v1/openapi.json`).

pub mod auth;
mod dashboard;
mod error;
mod queue;
mod servers;
mod subscriptions;
mod ui;
mod watch;

use std::{future::Future, net::SocketAddr, num::NonZeroU32, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, MatchedPath, Request},
    middleware::Next,
    response::Response,
    routing::get,
};
use keyfleet_queue::Queue;
use keyfleet_store::Store;
use utoipa::{
    Modify, OpenApi,
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
};
use utoipa_axum::{router::OpenApiRouter, routes};

pub use error::ApiError;

use crate::{producer::Producer, settings::Settings};

/// Request bodies larger than this are refused with 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub queue: Queue,
    pub producer: Producer,
    pub settings: Settings,
    gate: Arc<auth::Gate>,
    watch: watch::KeyWatch,
    /// How long an Idempotency-Key's receipt is kept.
    receipt_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// Requests per second per token, and the burst above it.
    pub rate_per_second: NonZeroU32,
    pub rate_burst: NonZeroU32,
    pub receipt_ttl: Duration,
}

impl Default for ApiOptions {
    fn default() -> Self {
        Self {
            rate_per_second: NonZeroU32::new(100).unwrap(),
            rate_burst: NonZeroU32::new(400).unwrap(),
            receipt_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

impl AppState {
    pub async fn new(settings: Settings, options: &ApiOptions) -> anyhow::Result<Self> {
        let store = settings.store().await?;
        let queue = settings.queue()?;
        let watch = watch::KeyWatch::start(store.clone()).await?;
        Ok(Self {
            producer: Producer::new(store.clone(), queue.clone()),
            store,
            queue,
            settings,
            gate: auth::Gate::new(options.rate_per_second, options.rate_burst),
            watch,
            receipt_ttl: options.receipt_ttl,
        })
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "keyfleet",
        description = "Provisions VPN access keys across a fleet of V2Ray and Outline servers. \
                       Every call takes `Authorization: Bearer <token>` (`keyfleet token create`).",
    ),
    modifiers(&BearerAuth),
    components(schemas(queue::SweepName, servers::ServerKindName)),
    tags(
        (name = "subscriptions", description = "What the purchase service calls"),
        (name = "servers", description = "The fleet"),
        (name = "queue", description = "Jobs, dead jobs and sweeps"),
        (name = "dashboard", description = "What the operators' dashboard (/ui) reads"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The `/v1` routes and the OpenAPI document describing them, from the same declarations.
fn v1() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(subscriptions::provision))
        .routes(routes!(subscriptions::deprovision))
        .routes(routes!(subscriptions::get))
        .routes(routes!(servers::list, servers::add))
        .routes(routes!(servers::patch))
        .routes(routes!(servers::bump_config))
        .routes(routes!(servers::pause))
        .routes(routes!(servers::resume))
        .routes(routes!(queue::queue))
        .routes(routes!(queue::dead_jobs))
        .routes(routes!(queue::replay))
        .routes(routes!(queue::discard))
        .routes(routes!(queue::sweep))
        .routes(routes!(dashboard::me))
        .routes(routes!(dashboard::fleet))
        .routes(routes!(dashboard::job_stats))
        .routes(routes!(dashboard::sweep_ticks))
        .split_for_parts()
}

/// The OpenAPI document (also served at `/v1/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    v1().1
}

/// The API, plus `/metrics`, `/healthz` and `/readyz` as on every role.
pub fn router(state: AppState) -> Router {
    let (routes, doc) = v1();
    let doc = Arc::new(doc);
    let observe = crate::observe::router(crate::observe::Health {
        store: state.store.clone(),
        queue: state.queue.clone(),
        claim_progress: None,
    });
    routes
        .route(
            "/v1/openapi.json",
            get(move || {
                let doc = Arc::clone(&doc);
                async move { Json(doc.as_ref().clone()) }
            }),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(log_request))
        .with_state(state)
        .merge(observe)
        .merge(ui::router())
        .fallback(|| async { ApiError::not_found("no such endpoint") })
}

/// One structured line per request: method, route (not the raw path, which holds ids), status
/// and duration.
async fn log_request(request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "(unmatched)".into());
    let response = next.run(request).await;
    tracing::info!(
        http.method = %method,
        http.route = %route,
        http.status = response.status().as_u16(),
        elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
        "request"
    );
    response
}

/// Serves the API on `listen` until `shutdown` resolves; prints the bound address first.
pub async fn serve(
    settings: Settings,
    options: ApiOptions,
    listen: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = bind(listen).await?;
    let bound = listener.local_addr()?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "keyfleet api listening on http://{bound}")?;
        out.flush()?;
    }
    tracing::info!("keyfleet api listening on http://{bound}");
    serve_on(settings, options, listener, shutdown).await
}

/// Binds the API's address (port 0: any free port; `local_addr` tells which).
pub async fn bind(listen: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))
}

/// Serves the API on a bound listener until `shutdown` resolves.
pub async fn serve_on(
    settings: Settings,
    options: ApiOptions,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = AppState::new(settings, &options).await?;
    let prune = tokio::spawn(prune_receipts(state.store.clone(), options.receipt_ttl));
    let served = axum::serve(listener, router(state).into_make_service())
        .with_graceful_shutdown(shutdown)
        .await;
    prune.abort();
    served.map_err(Into::into)
}

async fn prune_receipts(store: Store, ttl: Duration) {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        every.tick().await;
        if let Err(e) = store.prune_provision_receipts(ttl).await {
            tracing::warn!("pruning old provision receipts: {e}");
        }
    }
}
