//! Registering servers (validated input) and the worker's pool of one client per server.

use std::{collections::HashMap, sync::Arc};

use anyhow::{Context, bail};
use keyfleet_core::{ServerId, ServerKind};
use keyfleet_store::{NewServer, Server, Store};
use keyfleet_vpn::{ClientConfig, ServerEndpoint, VpnClient};
use parking_lot::RwLock;

/// Checks `server add` input and turns it into a row to insert; every error says which flag.
pub fn validate_new_server(
    name: &str,
    kind: &str,
    api_url: &str,
    api_key: Option<&str>,
    cert_sha256: Option<&str>,
    max_in_flight: u32,
) -> anyhow::Result<NewServer> {
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
        bail!(
            "--name {name:?}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        );
    }
    let kind: ServerKind = kind.parse().map_err(|e| anyhow::anyhow!("--kind: {e}"))?;
    let url = url::Url::parse(api_url)
        .with_context(|| format!("--api-url {api_url:?} is not a valid URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        bail!("--api-url {api_url:?} must be an http:// or https:// URL with a host");
    }
    if !(1..=1000).contains(&max_in_flight) {
        bail!("--max-in-flight {max_in_flight} is out of range: use 1..=1000");
    }
    let (api_key, cert_sha256) = match kind {
        ServerKind::V2ray => {
            if cert_sha256.is_some() {
                bail!("--cert-sha256 is for outline servers; a v2ray server takes --api-key");
            }
            match api_key {
                Some(key) if !key.trim().is_empty() => (Some(key.trim().to_owned()), None),
                _ => bail!("--api-key is required for a v2ray server"),
            }
        }
        ServerKind::Outline => {
            if api_key.is_some() {
                bail!("--api-key is for v2ray servers; an outline server takes --cert-sha256");
            }
            if url.scheme() != "https" {
                bail!(
                    "--api-url of an outline server must be https:// (its certificate is pinned)"
                );
            }
            let raw = cert_sha256.context("--cert-sha256 is required for an outline server")?;
            let pin = keyfleet_vpn::parse_cert_sha256(raw)
                .map_err(|e| anyhow::anyhow!("--cert-sha256: {e}"))?;
            (None, Some(hex_upper(&pin)))
        }
    };
    Ok(NewServer {
        name: name.to_owned(),
        kind,
        api_url: url.to_string().trim_end_matches('/').to_owned(),
        api_key,
        cert_sha256,
        max_in_flight: max_in_flight as i32,
    })
}

fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

pub fn endpoint_of(server: &Server) -> anyhow::Result<ServerEndpoint> {
    Ok(ServerEndpoint {
        kind: server.kind,
        api_url: url::Url::parse(&server.api_url).with_context(|| {
            format!(
                "server {:?} has an invalid api_url in the database",
                server.name
            )
        })?,
        api_key: server.api_key.clone(),
        cert_sha256: server.cert_sha256.clone(),
    })
}

/// One pooled client per server, built on first use from the server's row.
#[derive(Clone)]
pub struct ServerClients {
    store: Store,
    config: ClientConfig,
    clients: Arc<RwLock<HashMap<ServerId, VpnClient>>>,
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
        }
    }

    /// Builds the clients of these servers up front, so the first jobs do not each load their
    /// server's row. A server whose configuration is unusable is left for `get` to report.
    pub fn preload(&self, servers: &[Server]) {
        let mut clients = self.clients.write();
        for server in servers {
            if let Ok(endpoint) = endpoint_of(server)
                && let Ok(client) = VpnClient::new(&endpoint, &self.config)
            {
                clients.insert(server.id, client);
            }
        }
    }

    pub async fn get(&self, id: ServerId) -> Result<VpnClient, ClientError> {
        if let Some(client) = self.clients.read().get(&id) {
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
        let endpoint = endpoint_of(&server).map_err(|e| ClientError::Invalid(e.to_string()))?;
        let client = VpnClient::new(&endpoint, &self.config)
            .map_err(|e| ClientError::Invalid(format!("server {:?}: {e}", server.name)))?;
        self.clients.write().insert(id, client.clone());
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_server_input_names_the_flag() {
        let err = |r: anyhow::Result<NewServer>| r.unwrap_err().to_string();
        assert!(
            err(validate_new_server(
                "a",
                "wireguard",
                "http://h",
                Some("k"),
                None,
                4
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
                4
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
                4
            ))
            .contains("--api-url")
        );
        assert!(
            err(validate_new_server("a", "v2ray", "http://h", None, None, 4)).contains("--api-key")
        );
        assert!(
            err(validate_new_server(
                "a",
                "outline",
                "https://h/x",
                None,
                Some("zz"),
                4
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
                4
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
                0
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
        )
        .unwrap();
        assert_eq!(ok.cert_sha256.unwrap(), "AB".repeat(32));
        assert_eq!(ok.api_url, "https://127.0.0.1:1/s3cret");
    }
}
