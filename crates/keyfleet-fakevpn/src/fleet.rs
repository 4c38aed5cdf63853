use std::io;

use keyfleet_core::ServerKind;

use crate::{FakeServer, FakeServerConfig, MeterSnapshot};

/// V2Ray servers first, then Outline servers.
pub struct FakeFleet {
    pub servers: Vec<FakeServer>,
}

impl FakeFleet {
    /// Starts `v2ray` V2Ray and `outline` Outline servers; `template(kind, i)` configures the
    /// `i`-th server of that kind (counting from 0 per kind); the `kind` it returns is overridden.
    pub async fn start(
        v2ray: usize,
        outline: usize,
        template: impl Fn(ServerKind, usize) -> FakeServerConfig,
    ) -> io::Result<FakeFleet> {
        let mut servers = Vec::with_capacity(v2ray + outline);
        let plan = (0..v2ray)
            .map(|i| (ServerKind::V2ray, i))
            .chain((0..outline).map(|i| (ServerKind::Outline, i)));
        for (kind, i) in plan {
            let config = FakeServerConfig {
                kind,
                ..template(kind, i)
            };
            servers.push(FakeServer::start(config).await?);
        }
        Ok(FakeFleet { servers })
    }

    /// Counters summed over the fleet, peak in-flight the maximum of the servers' peaks, logs
    /// merged by `at_ms` (each relative to its own server's start).
    pub fn total_meter(&self) -> MeterSnapshot {
        let mut total = MeterSnapshot::default();
        for server in &self.servers {
            total.absorb(server.meter());
        }
        total
    }

    pub async fn shutdown(self) {
        let shutdowns = self.servers.into_iter().map(FakeServer::shutdown);
        for handle in shutdowns.map(tokio::spawn).collect::<Vec<_>>() {
            let _ = handle.await;
        }
    }
}
