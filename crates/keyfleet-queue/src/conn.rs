//! What the queue talks to Redis over: one multiplexed, reconnecting connection to a standalone
//! Redis or Valkey, or a cluster connection that sends each command to the node of its key's slot
//! (every key of a queue shares the slot of its hash tag, see `Queue::redis_key`).

use std::{sync::Arc, time::Duration};

use redis::{
    Cmd, Pipeline, RedisFuture, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
};
use tokio::sync::OnceCell;

use crate::{Error, Result};

/// How keyfleet reaches Redis (`KEYFLEET_REDIS_MODE`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RedisMode {
    /// One Redis or Valkey server (or a primary behind a proxy): `REDIS_URL` is its URL.
    #[default]
    Standalone,
    /// A Redis Cluster or Valkey cluster: `REDIS_URL` is a comma-separated list of seed nodes.
    Cluster,
}

impl RedisMode {
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "standalone" => Some(Self::Standalone),
            "cluster" => Some(Self::Cluster),
            _ => None,
        }
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub(crate) enum Conn {
    Standalone(ConnectionManager),
    Cluster(Arc<LazyCluster>),
}

/// Connected on first use, so that an unreachable cluster fails calls, not start-up; the
/// connection then follows slot moves and reconnects by itself.
pub(crate) struct LazyCluster {
    client: ClusterClient,
    conn: OnceCell<ClusterConnection>,
}

impl LazyCluster {
    async fn get(&self) -> redis::RedisResult<ClusterConnection> {
        self.conn
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}

/// The connection for commands, and a client of one node for the wake-up subscription (a
/// cluster delivers a publish on any node to subscribers on every node).
pub(crate) fn connect(redis_url: &str, mode: RedisMode) -> Result<(Conn, redis::Client)> {
    match mode {
        RedisMode::Standalone => {
            let client = open(redis_url)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(RESPONSE_TIMEOUT))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_secs(1));
            let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
            Ok((Conn::Standalone(conn), client))
        }
        RedisMode::Cluster => {
            let nodes: Vec<&str> = redis_url
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .collect();
            let first = nodes.first().ok_or_else(|| Error::BadUrl {
                url: String::new(),
                problem: "names no cluster node (want redis://host:port[,redis://host:port…])"
                    .into(),
            })?;
            let subscriber = open(first)?;
            for node in &nodes[1..] {
                open(node)?;
            }
            let client = ClusterClient::builder(nodes.iter().copied())
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(RESPONSE_TIMEOUT)
                .retries(2)
                .build()
                .map_err(|e| Error::BadUrl {
                    url: redacted(redis_url),
                    problem: e.to_string(),
                })?;
            let conn = Conn::Cluster(Arc::new(LazyCluster {
                client,
                conn: OnceCell::new(),
            }));
            Ok((conn, subscriber))
        }
    }
}

fn open(url: &str) -> Result<redis::Client> {
    redis::Client::open(url).map_err(|e| Error::BadUrl {
        url: redacted(url),
        problem: e.to_string(),
    })
}

/// The URL without its password (`redis://user:***@host:port`).
pub(crate) fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Standalone(conn) => conn.req_packed_command(cmd),
            Self::Cluster(cluster) => {
                Box::pin(async move { cluster.get().await?.req_packed_command(cmd).await })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Standalone(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(cluster) => Box::pin(async move {
                cluster
                    .get()
                    .await?
                    .req_packed_commands(pipeline, offset, count)
                    .await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Standalone(conn) => conn.get_db(),
            Self::Cluster(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_password() {
        assert_eq!(
            redacted("redis://:hunter2@redis:6379"),
            "redis://:***@redis:6379"
        );
        assert_eq!(
            redacted("rediss://kf:p@ss@r:6380/0"),
            "rediss://kf:***@r:6380/0"
        );
        assert_eq!(redacted("redis://r:6379"), "redis://r:6379");
    }

    #[test]
    fn a_bad_url_is_named_without_its_password() {
        let error = connect("http://:hunter2@h:6379", RedisMode::Standalone)
            .err()
            .unwrap()
            .to_string();
        assert!(!error.contains("hunter2"), "{error}");
        let error = connect(" , ", RedisMode::Cluster)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("no cluster node"), "{error}");
    }
}
