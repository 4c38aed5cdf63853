//! One fake server: the request pipeline (meter, auth, latency, faults) and the public handle.

use std::{
    convert::Infallible,
    fmt, io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Request, State},
    http::{
        HeaderValue, StatusCode,
        header::{CONTENT_TYPE, RETRY_AFTER},
        request::Parts,
    },
    response::Response,
};
use hyper::body::Frame;
use keyfleet_core::ServerKind;
use parking_lot::Mutex;
use rand::{Rng, SeedableRng, distr::Alphanumeric, rngs::StdRng};
use tokio::sync::watch;

use crate::{
    FakeServerConfig, FakeUser, Fault, FaultRates, MeterSnapshot,
    api::Api,
    endpoint::{Call, Endpoint},
    faults::Faults,
    hold::{Hold, Holds},
    meter::{Meter, Visit},
    net::{Net, wait_closing},
    outline::OutlineServer,
    tls,
    v2ray::V2rayPanel,
};

/// Request bodies above this size get 413.
const BODY_LIMIT: usize = 1 << 20;

/// A running fake server on 127.0.0.1. Clones share the server; it stops when `shutdown` is
/// called or the last clone is dropped.
#[derive(Clone)]
pub struct FakeServer {
    shared: Arc<Shared>,
}

struct Shared {
    inner: Arc<Inner>,
    net: Arc<Net>,
    api_url: String,
    api_key: Option<String>,
    cert_sha256: Option<String>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.inner.closing.send_replace(true);
        self.net.stop();
    }
}

/// What the request handler sees.
struct Inner {
    config: FakeServerConfig,
    api: Box<dyn Api>,
    meter: Arc<Meter>,
    faults: Faults,
    holds: Holds,
    rng: Mutex<StdRng>,
    /// Creates take turns while `create_latency_per_key` applies.
    create_turn: tokio::sync::Mutex<()>,
    closing: watch::Sender<bool>,
}

impl FakeServer {
    pub async fn start(config: FakeServerConfig) -> io::Result<FakeServer> {
        let (api, api_key, tls, secret): (Box<dyn Api>, _, _, _) = match config.kind {
            ServerKind::V2ray => {
                let key = random_token(32);
                (
                    Box::new(V2rayPanel::new(key.clone(), config.duplicate_policy)),
                    Some(key),
                    None,
                    None,
                )
            }
            ServerKind::Outline => {
                let secret = random_token(22);
                let api = OutlineServer::new(
                    &secret,
                    config.outline_version.clone(),
                    config.outline_has_key_ids(),
                );
                (Box::new(api), None, Some(tls::self_signed()?), Some(secret))
            }
            ServerKind::XrayGrpc => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "the fake fleet has no xray-grpc node",
                ));
            }
        };
        let (closing, closing_rx) = watch::channel(false);
        let inner = Arc::new(Inner {
            rng: Mutex::new(StdRng::seed_from_u64(config.seed)),
            config,
            api,
            meter: Arc::new(Meter::new()),
            faults: Faults::default(),
            holds: Holds::default(),
            create_turn: tokio::sync::Mutex::new(()),
            closing,
        });
        let router = Router::new().fallback(entry).with_state(Arc::clone(&inner));
        let (acceptor, cert_sha256) = tls.unzip();
        let net = Net::start(router, acceptor, closing_rx)?;
        let api_url = match secret {
            None => format!("http://{}", net.addr()),
            Some(secret) => format!("https://{}/{secret}", net.addr()),
        };
        tracing::debug!(kind = %inner.config.kind, %api_url, "Fake server started.");
        Ok(FakeServer {
            shared: Arc::new(Shared {
                inner,
                net,
                api_url,
                api_key,
                cert_sha256,
            }),
        })
    }

    pub fn kind(&self) -> ServerKind {
        self.inner().config.kind
    }

    pub fn config(&self) -> &FakeServerConfig {
        &self.inner().config
    }

    /// V2Ray: `http://127.0.0.1:PORT`; Outline: `https://127.0.0.1:PORT/SECRET`.
    pub fn api_url(&self) -> String {
        self.shared.api_url.clone()
    }

    /// V2Ray: the `X-API-Key` every request needs; Outline: `None`.
    pub fn api_key(&self) -> Option<String> {
        self.shared.api_key.clone()
    }

    /// Outline: uppercase hex SHA-256 of the served certificate's DER; V2Ray: `None`.
    pub fn cert_sha256(&self) -> Option<String> {
        self.shared.cert_sha256.clone()
    }

    /// The next `times` requests to `endpoint` (`None`: any endpoint) get `fault`. Faults scripted
    /// for the request's endpoint go before those for any endpoint; each queue is FIFO. Requests
    /// that fail auth (401 / wrong prefix) take no fault.
    pub fn inject(&self, endpoint: Option<Endpoint>, fault: Fault, times: u32) {
        self.inner().faults.inject(endpoint, fault, times);
    }

    /// Parks every request to `endpoint` that arrives from now until the hold is released or
    /// dropped: it is counted and in flight, and waits after its latency and right before its
    /// operation (and after its fault was drawn, so a `Status` fault answers after the release
    /// without acting). Like faults, requests that fail auth are not held. See [`Hold`].
    pub fn hold(&self, endpoint: Endpoint) -> Hold {
        self.inner().holds.add(endpoint)
    }

    pub fn set_fault_rates(&self, rates: FaultRates) {
        self.inner().faults.set_rates(rates);
    }

    /// Drops scripted faults and sets all rates to 0.
    pub fn clear_faults(&self) {
        self.inner().faults.clear();
    }

    /// `true`: the port closes at once (connects get ECONNREFUSED) and open connections are cut,
    /// so a request in flight or on a kept-alive connection fails with a closed/reset connection
    /// and is logged with status 0. `false`: listen on the same port again.
    pub fn set_refusing(&self, refusing: bool) {
        self.shared.net.set_refusing(refusing);
    }

    /// A node restart that loses every user; the meter and traffic counters stay.
    pub fn wipe(&self) {
        self.inner().api.wipe();
    }

    /// Adds a user keyfleet did not create (V2Ray: email and name = `name`; Outline: a key named
    /// `name`) and returns its id. Not counted by the meter.
    pub fn add_foreign_user(&self, name: &str) -> String {
        self.inner().api.add_foreign_user(name)
    }

    /// Current users or keys in creation order.
    pub fn users(&self) -> Vec<FakeUser> {
        self.inner().api.users()
    }

    /// Adds to a user's cumulative traffic (Outline reports `uplink + downlink` bytes). V2Ray
    /// ignores ids it has no user for; the counters outlive deletes and wipes.
    pub fn add_traffic(&self, id: &str, uplink: u64, downlink: u64) {
        self.inner().api.add_traffic(id, uplink, downlink);
    }

    /// Traffic counters back to 0, as after an Xray restart.
    pub fn reset_traffic_counters(&self) {
        self.inner().api.reset_traffic();
    }

    /// Changes every user's link. V2Ray: the Reality public key (`pbk`) is derived from `g`;
    /// Outline: the access-key hostname becomes `g<g>.localhost` (`127.0.0.1` for 0).
    pub fn set_link_generation(&self, g: u64) {
        self.inner().api.set_link_generation(g);
    }

    pub fn meter(&self) -> MeterSnapshot {
        let inner = self.inner();
        inner.meter.snapshot(inner.api.user_count() as u64)
    }

    pub fn reset_meter(&self) {
        self.inner().meter.reset();
    }

    /// Stops accepting, ends held responses early, waits up to 2 s for open connections, then
    /// cuts the rest. Stops the server for every clone.
    pub async fn shutdown(self) {
        self.inner().closing.send_replace(true);
        self.shared.net.shutdown().await;
    }

    fn inner(&self) -> &Inner {
        &self.shared.inner
    }
}

impl fmt::Debug for FakeServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeServer")
            .field("kind", &self.kind())
            .field("api_url", &self.shared.api_url)
            .finish()
    }
}

/// How much earlier than a request's latency tokio's timer is asked to wake (see `latency`).
const TIMER_SLACK: Duration = Duration::from_millis(2);

async fn entry(State(inner): State<Arc<Inner>>, request: Request) -> Response {
    inner.serve(request).await
}

impl Inner {
    async fn serve(&self, request: Request) -> Response {
        let (parts, body) = request.into_parts();
        let path = parts.uri.path();
        let call = self.api.route(&parts.method, path);
        let mut visit = self.meter.arrive(call.endpoint);
        let authorized = self.api.authorized(path, &parts.headers);
        let (delay, roll) = {
            let mut rng = self.rng.lock();
            (self.config.latency.sample(&mut *rng), rng.random::<f64>())
        };
        let fault = if authorized {
            self.faults.take(call.endpoint, roll)
        } else {
            None
        };
        let body = axum::body::to_bytes(body, BODY_LIMIT).await;
        self.latency(delay).await;
        if authorized {
            self.holds.pass(call.endpoint, &self.closing).await;
        }
        let streams = matches!(fault, Some(Fault::OversizedBody { .. }));
        let response = match body {
            _ if !authorized => self.api.unauthorized(),
            Ok(body) => self.respond(&parts, &call, &body, fault).await,
            Err(error) => self.api.error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("Could not read the body: {error}"),
            ),
        };
        visit.answered(response.status().as_u16());
        if streams {
            let (parts, body) = response.into_parts();
            return Response::from_parts(
                parts,
                Body::new(InFlight {
                    body,
                    _visit: visit,
                }),
            );
        }
        response
    }

    async fn respond(
        &self,
        request: &Parts,
        call: &Call,
        body: &[u8],
        fault: Option<Fault>,
    ) -> Response {
        let Some(fault) = fault else {
            return self.perform(call, body).await;
        };
        tracing::debug!(
            endpoint = call.endpoint.as_str(),
            ?fault,
            "Fake server injects a fault."
        );
        match fault {
            Fault::Status(code) => self.api.error(status(code), "Injected failure"),
            Fault::TooManyRequests { retry_after_secs } => {
                let mut response = self
                    .api
                    .error(StatusCode::TOO_MANY_REQUESTS, "Too many requests");
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
                response
            }
            Fault::Hang(hold) => {
                self.hold(hold).await;
                self.api.error(StatusCode::GATEWAY_TIMEOUT, "Timed out")
            }
            Fault::StatusAfterCommit(code) => {
                self.perform(call, body).await;
                self.api
                    .error(status(code), "Injected failure after commit")
            }
            Fault::LostResponseAfterCommit(hold) => {
                self.perform(call, body).await;
                self.hold(hold).await;
                self.api.error(StatusCode::GATEWAY_TIMEOUT, "Timed out")
            }
            Fault::MalformedBody => malformed(self.perform(call, body).await).await,
            Fault::OversizedBody { bytes } => Response::builder()
                .header(CONTENT_TYPE, "application/json")
                .body(Body::new(Filler::new(bytes)))
                .expect("a valid response"),
            Fault::InsertIntoField {
                field,
                offset,
                text,
            } => insert_into_field(self.perform(call, body).await, &field, offset, &text).await,
            Fault::NulInLink { offset } => {
                let response = self.perform(call, body).await;
                insert_into_field(response, self.api.link_field(), offset, "\0").await
            }
            Fault::EchoSecrets(code) => {
                let link = self.api.users().into_iter().next().map_or_else(
                    || {
                        "vless://00000000-0000-0000-0000-000000000000@127.0.0.1:443?type=tcp#x"
                            .to_owned()
                    },
                    |u| u.link,
                );
                let key = request
                    .headers
                    .get("x-api-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let page = format!(
                    "Traceback: error handling {} {} (X-API-Key: {key}); last link issued: {link}",
                    request.method, request.uri
                );
                self.api.error(status(code), &page)
            }
        }
    }

    /// Does the call. With `create_latency_per_key`, creates first queue for their turn and wait
    /// in proportion to the users already stored, like Outline rewriting its config per create.
    async fn perform(&self, call: &Call, body: &[u8]) -> Response {
        let per_key = self.config.create_latency_per_key;
        if !call.endpoint.is_create() || per_key.is_zero() {
            return self.api.handle(call, body, &self.meter);
        }
        let _turn = self.create_turn.lock().await;
        let users = u32::try_from(self.api.user_count()).unwrap_or(u32::MAX);
        self.hold(per_key.saturating_mul(users)).await;
        self.api.handle(call, body, &self.meter)
    }

    /// The request's latency, kept to a fraction of a millisecond: tokio's timer wheel fires on a
    /// millisecond tick, up to about a millisecond late, which would make a fixed 50 ms server a
    /// 51-52 ms one; the last stretch is slept on a blocking thread, which wakes on time.
    async fn latency(&self, delay: Duration) {
        let until = std::time::Instant::now() + delay;
        self.hold(delay.saturating_sub(TIMER_SLACK)).await;
        let rest = until.saturating_duration_since(std::time::Instant::now());
        // More than the slack left: the server is shutting down and the hold ended early.
        if !rest.is_zero() && rest <= TIMER_SLACK {
            let _ = tokio::task::spawn_blocking(move || std::thread::sleep(rest)).await;
        }
    }

    /// Sleeps, but ends early when the server shuts down.
    async fn hold(&self, duration: Duration) {
        if duration.is_zero() {
            return;
        }
        let mut closing = self.closing.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(duration) => {}
            _ = wait_closing(&mut closing) => {}
        }
    }
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// The response with its body cut in half: a strict prefix of a JSON object or array never
/// parses. Keeps a 2xx status, answering 200 where there was no body or no success.
async fn malformed(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let cut = if bytes.len() >= 2 {
        bytes.slice(..bytes.len() / 2)
    } else {
        Bytes::from_static(b"{")
    };
    if !parts.status.is_success() || parts.status == StatusCode::NO_CONTENT {
        parts.status = StatusCode::OK;
    }
    parts
        .headers
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Response::from_parts(parts, Body::from(cut))
}

/// A response body that keeps its request in flight (in the meter) until it ends or is dropped.
struct InFlight {
    body: Body,
    _visit: Visit,
}

impl hyper::body::Body for InFlight {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }
}

/// `[` and then spaces, `remaining` bytes in all, in 64 KiB chunks.
struct Filler {
    remaining: u64,
    started: bool,
    chunk: Bytes,
}

impl Filler {
    fn new(bytes: u64) -> Self {
        Self {
            remaining: bytes,
            started: false,
            chunk: Bytes::from(vec![b' '; 64 * 1024]),
        }
    }
}

impl hyper::body::Body for Filler {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let data = if self.started {
            let n = usize::try_from(self.remaining)
                .map_or(self.chunk.len(), |r| r.min(self.chunk.len()));
            self.chunk.slice(..n)
        } else {
            self.started = true;
            Bytes::from_static(b"[")
        };
        self.remaining -= data.len() as u64;
        Poll::Ready(Some(Ok(Frame::data(data))))
    }
}

/// The 2xx JSON response with `text` inserted into the first string field named `field`.
async fn insert_into_field(response: Response, field: &str, offset: usize, text: &str) -> Response {
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let Ok(mut json) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    if let Some(value) = first_string_field(&mut json, field) {
        let mut at = offset.min(value.len());
        while !value.is_char_boundary(at) {
            at -= 1;
        }
        value.insert_str(at, text);
    }
    let body = serde_json::to_vec(&json).expect("a JSON value serialises");
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

fn first_string_field<'v>(value: &'v mut serde_json::Value, field: &str) -> Option<&'v mut String> {
    match value {
        serde_json::Value::Object(map) => {
            if matches!(map.get(field), Some(serde_json::Value::String(_))) {
                return match map.get_mut(field) {
                    Some(serde_json::Value::String(s)) => Some(s),
                    _ => None,
                };
            }
            map.values_mut().find_map(|v| first_string_field(v, field))
        }
        serde_json::Value::Array(items) => {
            items.iter_mut().find_map(|v| first_string_field(v, field))
        }
        _ => None,
    }
}

fn random_token(len: usize) -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}
