//! The transport both clients share: one pooled reqwest client per server, URL building below
//! the API prefix, and the mapping of transport failures and HTTP statuses to [`Error`].

use std::{
    error::Error as StdError,
    time::{Instant, SystemTime},
};

use reqwest::{Method, StatusCode, header::HeaderMap};
use serde::{Serialize, de::DeserializeOwned};
use url::Url;

use crate::{
    ClientConfig, Error, Result,
    retry_after::parse_retry_after,
    tls::{fingerprint_hex, pin_mismatch_in, pinned_config, rustls_error_in},
};

/// How much of an error body goes into an error message.
const BODY_EXCERPT_CHARS: usize = 200;

/// How much of a non-2xx body is read: far more than an excerpt needs; the rest is not read and
/// the connection is dropped instead of reused.
const ERROR_BODY_BYTES: usize = 64 * 1024;

/// Histogram of every request a client makes, labelled `server` (the server's name in keyfleet,
/// never its URL), `endpoint` (a fixed name per API operation, never the path: ids and the Outline
/// prefix are in it) and `status` (`2xx`…`5xx`, or `error` when no complete response came back: a
/// timeout, a transport error, a body cut off or over the cap, or a request abandoned mid-way).
pub const REQUEST_DURATION_METRIC: &str = "keyfleet_vpn_request_duration_seconds";

/// What replaces a secret in an excerpt.
const REDACTED: &str = "<redacted>";

/// Share-link schemes: a link is a credential, so none may appear in a message.
const LINK_SCHEMES: [&str; 5] = ["vless", "vmess", "ss", "trojan", "ssconf"];

/// `scheme://host:port/…`: where a server is, without credentials, path (an Outline secret
/// prefix), query or fragment.
pub fn redact_url(url: &Url) -> String {
    let host = match url.host() {
        Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
        Some(host) => host.to_string(),
        None => "?".to_owned(),
    };
    let port = url
        .port_or_known_default()
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let path = if url.path().is_empty() || url.path() == "/" {
        ""
    } else {
        "/…"
    };
    format!("{}://{host}{port}{path}", url.scheme())
}

/// A response whose status the caller has not judged yet.
pub(crate) struct Reply {
    pub status: StatusCode,
    pub body: Vec<u8>,
    pub endpoint: String,
    retry_after: Option<std::time::Duration>,
}

pub(crate) struct Http {
    client: reqwest::Client,
    base: Url,
    /// The redacted base URL, used in every error and log line.
    server: String,
    /// Strings that must never appear in a message: the full base URL, its path (an Outline
    /// secret prefix) and the sensitive header values (the V2Ray API key).
    secrets: Vec<String>,
    max_body_bytes: usize,
    /// The pinned fingerprint as printed in errors.
    pin_hex: Option<String>,
    /// The server's name, the `server` label of [`REQUEST_DURATION_METRIC`].
    label: String,
}

impl Http {
    pub(crate) fn new(
        api_url: &Url,
        config: &ClientConfig,
        headers: HeaderMap,
        pin: Option<[u8; 32]>,
        label: &str,
    ) -> Result<Self> {
        let server = redact_url(api_url);
        if !matches!(api_url.scheme(), "http" | "https")
            || api_url.cannot_be_a_base()
            || api_url.host().is_none()
        {
            return Err(Error::Config {
                reason: format!("API URL {server} is not an http(s) URL with a host"),
            });
        }
        let mut base = api_url.clone();
        base.set_query(None);
        base.set_fragment(None);

        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("keyfleet/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers.clone());
        if let Some(pin) = pin {
            let tls = pinned_config(pin).map_err(|e| Error::Config {
                reason: format!("cannot build the TLS configuration for {server}: {e}"),
            })?;
            builder = builder.use_preconfigured_tls(tls);
        }
        let client = builder.build().map_err(|e| Error::Config {
            reason: format!("cannot build the HTTP client for {server}: {e}"),
        })?;

        let mut secrets = vec![base.as_str().trim_end_matches('/').to_owned()];
        let path = base.path().trim_matches('/');
        if !path.is_empty() {
            secrets.push(path.to_owned());
        }
        secrets.extend(
            headers
                .values()
                .filter(|v| v.is_sensitive())
                .filter_map(|v| v.to_str().ok())
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty()),
        );
        // Longest first, so a secret that contains another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Ok(Self {
            client,
            base,
            server,
            secrets,
            max_body_bytes: config.max_body_bytes,
            pin_hex: pin.as_ref().map(fingerprint_hex),
            label: label.to_owned(),
        })
    }

    pub(crate) fn server(&self) -> &str {
        &self.server
    }

    /// [`Error::InvalidText`]: `detail` says what was wrong where, never the text itself.
    pub(crate) fn invalid_text(&self, endpoint: impl Into<String>, detail: String) -> Error {
        Error::InvalidText {
            server: self.server.clone(),
            endpoint: endpoint.into(),
            detail,
        }
    }

    fn url(&self, path: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("checked in Http::new: the URL can be a base")
            .pop_if_empty()
            .extend(path);
        url
    }

    /// `operation` names the API operation in the request metrics (a fixed name such as
    /// `create_user`: never a path, which holds ids and the Outline secret prefix).
    pub(crate) async fn call(
        &self,
        operation: &'static str,
        method: Method,
        path: &[&str],
    ) -> Result<Reply> {
        self.send(operation, method, path, None::<&()>).await
    }

    pub(crate) async fn call_json<B: Serialize + ?Sized>(
        &self,
        operation: &'static str,
        method: Method,
        path: &[&str],
        body: &B,
    ) -> Result<Reply> {
        self.send(operation, method, path, Some(body)).await
    }

    async fn send<B: Serialize + ?Sized>(
        &self,
        operation: &'static str,
        method: Method,
        path: &[&str],
        body: Option<&B>,
    ) -> Result<Reply> {
        let mut timing = RequestTiming {
            server: &self.label,
            operation,
            started: Instant::now(),
            status: None,
        };
        let reply = self.exchange(method, path, body).await;
        timing.status = Some(match &reply {
            Ok(reply) => status_class(reply.status),
            Err(_) => "error",
        });
        reply
    }

    async fn exchange<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &[&str],
        body: Option<&B>,
    ) -> Result<Reply> {
        let endpoint = format!("{method} /{}", path.join("/"));
        let mut request = self.client.request(method, self.url(path));
        if let Some(body) = body {
            request = request.json(body);
        }
        let started = Instant::now();
        let response = request
            .send()
            .await
            .map_err(|e| self.transport_error(&endpoint, &e))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let body = self.read_body(response, &endpoint).await?;
        tracing::debug!(
            server = %self.server,
            endpoint = %endpoint,
            status = status.as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "VPN API call finished"
        );
        Ok(Reply {
            status,
            body,
            endpoint,
            retry_after,
        })
    }

    /// The body, read chunk by chunk so that one over the cap is cut off instead of buffered: a
    /// 2xx body over `max_body_bytes` is [`Error::BodyTooLarge`]; a non-2xx body is only needed
    /// for an excerpt, so it is cut at [`ERROR_BODY_BYTES`] and the status still decides.
    async fn read_body(&self, mut response: reqwest::Response, endpoint: &str) -> Result<Vec<u8>> {
        let success = response.status().is_success();
        let cap = if success {
            self.max_body_bytes
        } else {
            ERROR_BODY_BYTES.min(self.max_body_bytes)
        };
        let too_large = || Error::BodyTooLarge {
            server: self.server.clone(),
            endpoint: endpoint.to_owned(),
            limit: self.max_body_bytes,
        };
        let announced = response.content_length();
        if success && announced.is_some_and(|n| n > cap as u64) {
            return Err(too_large());
        }
        let mut body = Vec::with_capacity(announced.map_or(0, |n| n.min(cap as u64) as usize));
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.transport_error(endpoint, &e))?
        {
            let room = cap - body.len();
            if chunk.len() > room {
                if success {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk[..room]);
                break;
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// The reply if its status is a success, else the error its status means.
    pub(crate) fn success(&self, reply: Reply) -> Result<Reply> {
        if reply.status.is_success() {
            Ok(reply)
        } else {
            Err(self.status_error(&reply))
        }
    }

    /// A successful reply's body as `T`.
    pub(crate) fn json<T: DeserializeOwned>(&self, reply: Reply) -> Result<T> {
        let reply = self.success(reply)?;
        serde_json::from_slice(&reply.body).map_err(|e| Error::Decode {
            server: self.server.clone(),
            endpoint: reply.endpoint.clone(),
            detail: self.excerpt(&e.to_string()),
        })
    }

    pub(crate) fn status_error(&self, reply: &Reply) -> Error {
        let server = self.server.clone();
        let endpoint = reply.endpoint.clone();
        let body = self.excerpt(&String::from_utf8_lossy(&reply.body));
        let status = reply.status;
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Error::Unauthorized { server },
            StatusCode::TOO_MANY_REQUESTS => Error::RateLimited {
                server,
                retry_after: reply.retry_after,
            },
            StatusCode::NOT_FOUND => Error::NotFound {
                server,
                what: format!("{endpoint} returned 404: {body}"),
            },
            StatusCode::CONFLICT => Error::Conflict {
                server,
                detail: format!("{endpoint} returned 409: {body}"),
            },
            s if s.is_server_error() => Error::ServerError {
                server,
                endpoint,
                status: s.as_u16(),
                body,
            },
            s => Error::BadRequest {
                server,
                endpoint,
                status: s.as_u16(),
                body,
            },
        }
    }

    fn transport_error(&self, endpoint: &str, err: &reqwest::Error) -> Error {
        let server = self.server.clone();
        if let Some(actual) = pin_mismatch_in(err) {
            return Error::CertificateMismatch {
                server,
                expected: self.pin_hex.clone().unwrap_or_default(),
                actual: fingerprint_hex(&actual),
            };
        }
        let detail = self.excerpt(&describe_causes(err));
        if rustls_error_in(err).is_some() {
            return Error::Tls { server, detail };
        }
        if err.is_connect() {
            return Error::Connect { server, detail };
        }
        if err.is_timeout() {
            return Error::Timeout {
                server,
                endpoint: endpoint.to_owned(),
            };
        }
        if err.is_builder() {
            return Error::Config {
                reason: format!("cannot build the request {endpoint} for {server}: {detail}"),
            };
        }
        Error::Interrupted {
            server,
            endpoint: endpoint.to_owned(),
            detail,
        }
    }

    /// At most [`BODY_EXCERPT_CHARS`] characters of `text`, with the secrets (URL path, API key)
    /// and every share link replaced by [`REDACTED`]. Redacts before it cuts, so no secret is
    /// left half-visible.
    pub(crate) fn excerpt(&self, text: &str) -> String {
        let mut text = text.trim().to_owned();
        for secret in &self.secrets {
            text = text.replace(secret.as_str(), REDACTED);
        }
        let text = redact_links(&text);
        match text.char_indices().nth(BODY_EXCERPT_CHARS) {
            Some((cut, _)) => format!("{}…", &text[..cut]),
            None => text,
        }
    }
}

/// Records one request in [`REQUEST_DURATION_METRIC`] when dropped: with the status class it ended
/// with, or as `error` if it never ended (its future was dropped: the attempt was stopped).
struct RequestTiming<'a> {
    server: &'a str,
    operation: &'static str,
    started: Instant,
    status: Option<&'static str>,
}

impl Drop for RequestTiming<'_> {
    fn drop(&mut self) {
        metrics::histogram!(
            REQUEST_DURATION_METRIC,
            "server" => self.server.to_owned(),
            "endpoint" => self.operation,
            "status" => self.status.unwrap_or("error"),
        )
        .record(self.started.elapsed().as_secs_f64());
    }
}

/// `2xx`, `3xx`, `4xx` or `5xx`.
fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() / 100 {
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "error",
    }
}

/// `text` with every share link (`vless://…`, also JSON-escaped `vless:\/\/…`) replaced by
/// [`REDACTED`] up to the next whitespace, quote or angle bracket.
fn redact_links(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        let sep = if bytes[i..].starts_with(b"://") {
            3
        } else if bytes[i..].starts_with(br":\/\/") {
            5
        } else {
            i += 1;
            continue;
        };
        let start = bytes[..i]
            .iter()
            .rposition(|b| !(b.is_ascii_alphanumeric() || b"+.-".contains(b)))
            .map_or(0, |p| p + 1);
        let scheme = &text[start..i];
        if !LINK_SCHEMES.iter().any(|s| s.eq_ignore_ascii_case(scheme)) {
            i += sep;
            continue;
        }
        let end = bytes[i + sep..]
            .iter()
            .position(|b| b.is_ascii_whitespace() || b"\"'<>`".contains(b))
            .map_or(bytes.len(), |p| i + sep + p);
        out.push_str(&text[copied..start]);
        out.push_str(REDACTED);
        copied = end;
        i = end;
    }
    out.push_str(&text[copied..]);
    out
}

/// The causes of a reqwest error, without reqwest's own message (it contains the URL).
fn describe_causes(err: &reqwest::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = err.source();
    while let Some(e) = current {
        let part = e.to_string();
        if !parts.iter().any(|p| p.contains(&part)) {
            parts.push(part);
        }
        current = e.source();
    }
    if parts.is_empty() {
        let kind = if err.is_timeout() {
            "timed out"
        } else {
            "failed"
        };
        return format!("request {kind}");
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn redaction_hides_prefix_and_credentials() {
        assert_eq!(
            redact_url(&url("https://1.2.3.4:8443/Xy7SecretPrefix")),
            "https://1.2.3.4:8443/…"
        );
        assert_eq!(
            redact_url(&url("https://1.2.3.4:8443/Xy7SecretPrefix/")),
            "https://1.2.3.4:8443/…"
        );
        assert_eq!(
            redact_url(&url("https://user:pw@vpn.example.net/")),
            "https://vpn.example.net:443"
        );
        assert_eq!(
            redact_url(&url("http://vpn.example.net:8080?key=s3cret#frag")),
            "http://vpn.example.net:8080"
        );
        assert_eq!(
            redact_url(&url("https://[::1]:9000/abc")),
            "https://[::1]:9000/…"
        );
    }

    fn http(base: &str) -> Http {
        Http::new(
            &url(base),
            &ClientConfig::default(),
            HeaderMap::new(),
            None,
            "s",
        )
        .unwrap()
    }

    #[test]
    fn urls_go_below_the_prefix_and_ids_are_one_segment() {
        let h = http("https://h:1/SECRET");
        assert_eq!(
            h.url(&["access-keys", "kf-a"]).as_str(),
            "https://h:1/SECRET/access-keys/kf-a"
        );
        let h = http("https://h:1/SECRET/");
        assert_eq!(h.url(&["server"]).as_str(), "https://h:1/SECRET/server");
        assert_eq!(
            h.url(&["access-keys", "a/b?c"]).as_str(),
            "https://h:1/SECRET/access-keys/a%2Fb%3Fc"
        );
        let h = http("http://h:1");
        assert_eq!(h.url(&["api", "users"]).as_str(), "http://h:1/api/users");
    }

    #[test]
    fn excerpts_are_short_and_scrubbed() {
        let h = http("https://h:1/SECRET");
        let long = "é".repeat(500);
        let e = h.excerpt(&long);
        assert_eq!(e.chars().count(), BODY_EXCERPT_CHARS + 1);
        assert_eq!(
            h.excerpt("error for https://h:1/SECRET/server"),
            "error for <redacted>/server"
        );
        assert_eq!(h.excerpt("path SECRET leaked"), "path <redacted> leaked");
        // The link is cut out before the excerpt is cut short.
        let e = h.excerpt(&format!("{} vless://uuid@h:1?pbk=KEY#n", "x".repeat(190)));
        assert!(!e.contains("vless") && !e.contains("uuid"), "{e}");
    }

    #[test]
    fn links_and_api_keys_are_redacted() {
        assert_eq!(
            redact_links(
                r#"{"link":"vless://u@h:1?a=b&c=d#n","x":"VMESS://eyJ2Ijo","y":"ss:\/\/c2Vj@h:1"}"#
            ),
            r#"{"link":"<redacted>","x":"<redacted>","y":"<redacted>"}"#
        );
        assert_eq!(
            redact_links("a trojan://pw@h:443 and ssconf://h/x\nnext <ss://k@h>"),
            "a <redacted> and <redacted>\nnext <<redacted>>"
        );
        assert_eq!(
            redact_links("see https://example.com/ss://x and class://y and é ss://k"),
            "see https://example.com/<redacted> and class://y and é <redacted>"
        );
        let mut headers = HeaderMap::new();
        let mut key = reqwest::header::HeaderValue::from_static("K3y-s3cret");
        key.set_sensitive(true);
        headers.insert("x-api-key", key);
        let h = Http::new(
            &url("http://h:1"),
            &ClientConfig::default(),
            headers,
            None,
            "s",
        )
        .unwrap();
        assert_eq!(
            h.excerpt("invalid key K3y-s3cret, try again"),
            "invalid key <redacted>, try again"
        );
    }

    #[test]
    fn statuses_map_to_errors() {
        let h = http("https://h:1/SECRET");
        let reply = |status: u16, body: &str| Reply {
            status: StatusCode::from_u16(status).unwrap(),
            body: body.as_bytes().to_vec(),
            endpoint: "GET /x".into(),
            retry_after: None,
        };
        assert!(matches!(
            h.status_error(&reply(401, "")),
            Error::Unauthorized { .. }
        ));
        assert!(matches!(
            h.status_error(&reply(404, "")),
            Error::NotFound { .. }
        ));
        assert!(matches!(
            h.status_error(&reply(409, "")),
            Error::Conflict { .. }
        ));
        assert!(matches!(
            h.status_error(&reply(400, "")),
            Error::BadRequest { status: 400, .. }
        ));
        assert!(matches!(
            h.status_error(&reply(503, "down")),
            Error::ServerError { status: 503, .. }
        ));
        assert!(matches!(
            h.status_error(&reply(429, "")),
            Error::RateLimited {
                retry_after: None,
                ..
            }
        ));
        assert!(matches!(
            h.json::<u32>(reply(200, "{")),
            Err(Error::Decode { .. })
        ));
        assert_eq!(h.json::<u32>(reply(200, "7")).unwrap(), 7);
    }

    #[test]
    fn rejects_urls_that_are_not_http() {
        let cfg = ClientConfig::default();
        for bad in ["ftp://h/x", "mailto:a@b", "file:///tmp/x"] {
            let err = Http::new(&url(bad), &cfg, HeaderMap::new(), None, "s")
                .err()
                .unwrap();
            assert!(matches!(err, Error::Config { .. }), "{bad}: {err}");
        }
    }
}
