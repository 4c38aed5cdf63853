//! Registering servers (validated input) and the worker's pool of one client per server.

use std::{collections::HashMap, path::Path, sync::Arc};

use anyhow::{Context, bail};
use keyfleet_core::{ServerId, ServerKind};
use keyfleet_store::{NewServer, Server, Store};
use keyfleet_vpn::{ClientConfig, ServerEndpoint, VpnClient};
use parking_lot::RwLock;

use crate::settings::read_secret_file;

mod grpc;

pub use grpc::{GrpcInput, validate_grpc};

/// A secret `server add` takes: `value` from its flag or its variable (clap reads either), or the
/// content of `file` (the flag's `-file` form). Errors name the flags and the path, never the
/// secret.
pub fn server_secret(
    flag: &str,
    var: &str,
    value: Option<String>,
    file: Option<&Path>,
) -> anyhow::Result<Option<String>> {
    match (value, file) {
        (Some(_), Some(_)) => {
            bail!("{flag} (or {var}) and {flag}-file are both given: use only one of them")
        }
        (Some(value), None) => Ok(Some(value)),
        (None, Some(path)) => read_secret_file(&format!("{flag}-file"), path).map(Some),
        (None, None) => Ok(None),
    }
}

/// The warning for a secret given on the command line (kept working for compatibility).
pub fn secret_on_command_line_warning(flag: &str, var: &str) -> String {
    format!(
        "warning: {flag} on the command line can be read by every user of this machine (ps, /proc) and stays in shell history: use {flag}-file PATH or {var} instead"
    )
}

/// Bad server input: which field, and what is wrong with it. The CLI shows the field as its flag
/// (`--api-url`), the API as its JSON name (`api_url`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--{}: {problem}", field.replace('_', "-"))]
pub struct InvalidServer {
    pub field: &'static str,
    pub problem: String,
}

fn invalid(field: &'static str, problem: impl Into<String>) -> InvalidServer {
    InvalidServer {
        field,
        problem: problem.into(),
    }
}

/// Checks `server add` input and turns it into a row to insert; every error names its field.
/// An xray-grpc server gets a new random `key_secret` (its users' uuids derive from it).
pub fn validate_new_server(
    name: &str,
    kind: &str,
    api_url: &str,
    api_key: Option<&str>,
    cert_sha256: Option<&str>,
    max_in_flight: u32,
    grpc: Option<&GrpcInput>,
) -> Result<NewServer, InvalidServer> {
    let valid_name = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !valid_name {
        return Err(invalid(
            "name",
            format!(
                "{name:?}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
            ),
        ));
    }
    let kind: ServerKind = kind
        .parse()
        .map_err(|e: keyfleet_core::InvalidValue| invalid("kind", e.to_string()))?;
    let api_url = validate_api_url(kind, api_url)?;
    validate_limit(max_in_flight)?;
    if kind == ServerKind::XrayGrpc {
        if api_key.is_some() {
            return Err(invalid(
                "api_key",
                "not for xray-grpc servers: the node's gRPC API has no key (keep it on loopback or behind a tunnel)",
            ));
        }
        if cert_sha256.is_some() {
            return Err(invalid("cert_sha256", "only for outline servers"));
        }
        let settings = validate_grpc(grpc.unwrap_or(&GrpcInput::default()))?;
        return Ok(NewServer {
            name: name.to_owned(),
            kind,
            api_url,
            api_key: None,
            cert_sha256: None,
            max_in_flight: max_in_flight as i32,
            grpc: Some(serde_json::to_value(&settings).expect("settings serialise")),
            key_secret: Some(uuid::Uuid::new_v4().simple().to_string()),
        });
    }
    grpc::reject_grpc_input(grpc, kind.as_str())?;
    let (api_key, cert_sha256) = match kind {
        ServerKind::V2ray => {
            if cert_sha256.is_some() {
                return Err(invalid(
                    "cert_sha256",
                    "only for outline servers; a v2ray server takes an API key",
                ));
            }
            let key = api_key.ok_or_else(|| invalid("api_key", "required for a v2ray server"))?;
            (Some(validate_api_key(key)?), None)
        }
        // Returned above.
        ServerKind::XrayGrpc => (None, None),
        ServerKind::Outline => {
            if api_key.is_some() {
                return Err(invalid(
                    "api_key",
                    "only for v2ray servers; an outline server takes a certificate pin",
                ));
            }
            let raw = cert_sha256
                .ok_or_else(|| invalid("cert_sha256", "required for an outline server"))?;
            (None, Some(validate_cert_sha256(raw)?))
        }
    };
    Ok(NewServer {
        name: name.to_owned(),
        kind,
        api_url,
        api_key,
        cert_sha256,
        max_in_flight: max_in_flight as i32,
        grpc: None,
        key_secret: None,
    })
}

/// A server's API URL, normalised; Outline's must be https (its certificate is pinned). The URL
/// itself is never quoted: Outline's carries its secret prefix.
pub fn validate_api_url(kind: ServerKind, api_url: &str) -> Result<String, InvalidServer> {
    let url = url::Url::parse(api_url)
        .map_err(|e| invalid("api_url", format!("not a valid URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(invalid(
            "api_url",
            "must be an http:// or https:// URL with a host",
        ));
    }
    if kind == ServerKind::Outline && url.scheme() != "https" {
        return Err(invalid(
            "api_url",
            "must be https:// for an outline server (its certificate is pinned)",
        ));
    }
    if kind == ServerKind::XrayGrpc && (url.scheme() != "http" || !matches!(url.path(), "" | "/")) {
        return Err(invalid(
            "api_url",
            "must be http://HOST:PORT for an xray-grpc server (the node's API inbound speaks plaintext HTTP/2; no path)",
        ));
    }
    Ok(url.to_string().trim_end_matches('/').to_owned())
}

pub fn validate_api_key(key: &str) -> Result<String, InvalidServer> {
    let key = key.trim();
    if key.is_empty() || key.len() > 512 || key.chars().any(|c| c.is_control()) {
        return Err(invalid(
            "api_key",
            "must be 1-512 characters without control characters",
        ));
    }
    Ok(key.to_owned())
}

pub fn validate_cert_sha256(raw: &str) -> Result<String, InvalidServer> {
    let pin =
        keyfleet_vpn::parse_cert_sha256(raw).map_err(|e| invalid("cert_sha256", e.to_string()))?;
    Ok(hex_upper(&pin))
}

pub fn validate_limit(max_in_flight: u32) -> Result<u32, InvalidServer> {
    if !(1..=1000).contains(&max_in_flight) {
        return Err(invalid(
            "max_in_flight",
            format!("{max_in_flight} is out of range: use 1..=1000"),
        ));
    }
    Ok(max_in_flight)
}

fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

pub fn endpoint_of(server: &Server) -> anyhow::Result<ServerEndpoint> {
    Ok(ServerEndpoint {
        name: server.name.clone(),
        kind: server.kind,
        api_url: url::Url::parse(&server.api_url).with_context(|| {
            format!(
                "server {:?} has an invalid api_url in the database",
                server.name
            )
        })?,
        api_key: server.api_key.clone(),
        cert_sha256: server.cert_sha256.clone(),
        grpc: server
            .grpc
            .clone()
            .map(serde_json::from_value)
            .transpose()
            .with_context(|| {
                format!(
                    "server {:?} has invalid gRPC settings in the database",
                    server.name
                )
            })?,
        key_secret: server.key_secret.clone(),
    })
}

/// One pooled client per server, built on first use from the server's row, and rebuilt when the
/// row's revision moves (`refresh`).
#[derive(Clone)]
pub struct ServerClients {
    store: Store,
    config: ClientConfig,
    clients: Arc<RwLock<HashMap<ServerId, (i64, VpnClient)>>>,
    /// Each server's name as Postgres has it, for metric labels (kept even when its client could
    /// not be built).
    names: Arc<RwLock<HashMap<ServerId, String>>>,
}

/// Why no client could be had for a server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Postgres could not be asked; try again later.
    #[error("{0}")]
    Unavailable(String),
    /// The server is unknown or its configuration is unusable; retrying cannot help.
    #[error("{0}")]
    Invalid(String),
}

impl ServerClients {
    pub fn new(store: Store, config: ClientConfig) -> Self {
        Self {
            store,
            config,
            clients: Arc::default(),
            names: Arc::default(),
        }
    }

    /// Builds the clients of these servers up front, so the first jobs do not each load their
    /// server's row. A server whose configuration is unusable is left for `get` to report.
    pub fn preload(&self, servers: &[Server]) {
        let mut clients = self.clients.write();
        let mut names = self.names.write();
        for server in servers {
            names.insert(server.id, server.name.clone());
            if let Ok(endpoint) = endpoint_of(server)
                && let Ok(client) = VpnClient::new(&endpoint, &self.config)
            {
                clients.insert(server.id, (server.revision, client));
            }
        }
    }

    /// Drops the clients of servers whose settings changed (or that are gone): the next job
    /// builds one from the new row. Returns how many were dropped.
    pub fn forget_changed(&self, servers: &[Server]) -> usize {
        let current: HashMap<ServerId, i64> = servers.iter().map(|s| (s.id, s.revision)).collect();
        let mut clients = self.clients.write();
        let before = clients.len();
        clients.retain(|id, (revision, _)| current.get(id) == Some(revision));
        before - clients.len()
    }

    /// Every `every`, re-reads the servers from Postgres: changed credentials or URLs rebuild
    /// the server's client, and limits and operator pauses are pushed to the queue (so they
    /// converge even if the call that changed them could not reach Redis).
    pub async fn refresh_every(self, queue: keyfleet_queue::Queue, every: std::time::Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let servers = match self.store.list_servers().await {
                Ok(servers) => servers,
                Err(e) => {
                    tracing::debug!("refreshing the servers' settings: {e}");
                    continue;
                }
            };
            let dropped = self.forget_changed(&servers);
            if dropped > 0 {
                tracing::info!(
                    servers = dropped,
                    "Server settings changed; their clients are rebuilt."
                );
            }
            if let Err(e) = apply_to_queue(&queue, &servers).await {
                tracing::debug!("pushing server limits and pauses to Redis: {e}");
            }
        }
    }

    pub async fn get(&self, id: ServerId) -> Result<VpnClient, ClientError> {
        if let Some((_, client)) = self.clients.read().get(&id) {
            return Ok(client.clone());
        }
        let server = match self.store.server(id).await {
            Ok(Some(server)) => server,
            Ok(None) => return Err(ClientError::Invalid(format!("server {id} does not exist"))),
            Err(e) => {
                return Err(ClientError::Unavailable(format!(
                    "cannot load server {id}: {e}"
                )));
            }
        };
        self.names.write().insert(id, server.name.clone());
        let endpoint = endpoint_of(&server).map_err(|e| ClientError::Invalid(e.to_string()))?;
        let client = VpnClient::new(&endpoint, &self.config)
            .map_err(|e| ClientError::Invalid(format!("server {:?}: {e}", server.name)))?;
        self.clients
            .write()
            .insert(id, (server.revision, client.clone()));
        Ok(client)
    }

    /// The server's name (the `server` label of its metrics), once `preload` or `get` read its
    /// row; `"unknown"` before, or for a server Postgres does not have.
    pub fn name(&self, id: ServerId) -> String {
        self.names
            .read()
            .get(&id)
            .cloned()
            .unwrap_or_else(|| "unknown".to_owned())
    }
}

/// Makes the queue's limits and operator pauses what Postgres says.
pub async fn apply_to_queue(
    queue: &keyfleet_queue::Queue,
    servers: &[Server],
) -> anyhow::Result<()> {
    crate::producer::sync_limits(queue, servers).await?;
    let held: std::collections::HashSet<ServerId> =
        queue.paused_servers().await?.into_iter().collect();
    for server in servers {
        match (server.paused, held.contains(&server.id)) {
            (true, false) => {
                queue.pause_server(server.id).await?;
            }
            (false, true) => {
                queue.resume_server(server.id).await?;
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_server_input_names_the_flag() {
        let err = |r: Result<NewServer, InvalidServer>| r.unwrap_err().to_string();
        assert!(
            err(validate_new_server(
                "a",
                "wireguard",
                "http://h",
                Some("k"),
                None,
                4,
                None
            ))
            .contains("--kind")
        );
        assert!(
            err(validate_new_server(
                "a",
                "v2ray",
                "not a url",
                Some("k"),
                None,
                4,
                None
            ))
            .contains("--api-url")
        );
        assert!(
            err(validate_new_server(
                "a",
                "v2ray",
                "ftp://h",
                Some("k"),
                None,
                4,
                None
            ))
            .contains("--api-url")
        );
        assert!(
            err(validate_new_server(
                "a", "v2ray", "http://h", None, None, 4, None
            ))
            .contains("--api-key")
        );
        assert!(
            err(validate_new_server(
                "a",
                "outline",
                "https://h/x",
                None,
                Some("zz"),
                4,
                None
            ))
            .contains("--cert-sha256")
        );
        assert!(
            err(validate_new_server(
                "a b",
                "v2ray",
                "http://h",
                Some("k"),
                None,
                4,
                None
            ))
            .contains("--name")
        );
        assert!(
            err(validate_new_server(
                "a",
                "v2ray",
                "http://h",
                Some("k"),
                None,
                0,
                None
            ))
            .contains("--max-in-flight")
        );
        let ok = validate_new_server(
            "de-1",
            "outline",
            "https://127.0.0.1:1/s3cret/",
            None,
            Some(&"ab".repeat(32)),
            2,
            None,
        )
        .unwrap();
        assert_eq!(ok.cert_sha256.unwrap(), "AB".repeat(32));
        assert_eq!(ok.api_url, "https://127.0.0.1:1/s3cret");
    }

    #[test]
    fn a_bad_api_url_is_never_echoed() {
        for bad in ["https://h:99999/s3cret", "ftp://h/s3cret", "s3cret"] {
            let e = validate_new_server("a", "outline", bad, None, Some(&"ab".repeat(32)), 2, None)
                .unwrap_err()
                .to_string();
            assert!(e.contains("--api-url") && !e.contains("s3cret"), "{e}");
        }
    }

    #[test]
    fn server_secrets_come_from_a_flag_or_a_file_not_both() {
        let key = || Some("k3y".to_owned());
        assert_eq!(
            server_secret("--api-key", "KEYFLEET_SERVER_API_KEY", key(), None).unwrap(),
            key()
        );
        assert_eq!(
            server_secret("--api-key", "KEYFLEET_SERVER_API_KEY", None, None).unwrap(),
            None
        );
        let e = server_secret(
            "--api-key",
            "KEYFLEET_SERVER_API_KEY",
            key(),
            Some(Path::new("/x")),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("--api-key (or KEYFLEET_SERVER_API_KEY) and --api-key-file are both given"),
            "{e}"
        );
        assert!(!e.contains("k3y"), "{e}");

        let dir =
            std::env::temp_dir().join(format!("kf-servers-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).unwrap();
        let file = dir.join("api-url");
        std::fs::write(&file, "https://1.2.3.4:31245/s3cret\n").unwrap();
        let url = server_secret("--api-url", "KEYFLEET_SERVER_API_URL", None, Some(&file));
        let missing = dir.join("nope");
        let e = server_secret("--api-url", "KEYFLEET_SERVER_API_URL", None, Some(&missing))
            .unwrap_err()
            .to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            url.unwrap().as_deref(),
            Some("https://1.2.3.4:31245/s3cret")
        );
        assert!(
            e.contains("--api-url-file")
                && e.contains(missing.to_str().unwrap())
                && e.contains("cannot read"),
            "{e}"
        );
    }
}
