use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::InvalidValue;

/// Database id of a VPN server (the `servers.id` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ServerId(pub i64);

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Which management API a server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerKind {
    /// The V2Ray/Xray panel API (`X-API-Key` auth), see `shared/specs/v2ray-panel-api.md`.
    V2ray,
    /// The Outline server management API (secret path prefix, pinned self-signed certificate).
    Outline,
    /// An Xray-core or V2Ray node driven over its own gRPC API (HandlerService, StatsService).
    XrayGrpc,
}

impl ServerKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::V2ray => "v2ray",
            Self::Outline => "outline",
            Self::XrayGrpc => "xray-grpc",
        }
    }
}

impl fmt::Display for ServerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ServerKind {
    type Err = InvalidValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "v2ray" => Ok(Self::V2ray),
            "outline" => Ok(Self::Outline),
            "xray-grpc" => Ok(Self::XrayGrpc),
            other => Err(InvalidValue::new(
                "server kind",
                format!("{other:?} is not one of \"v2ray\", \"outline\", \"xray-grpc\""),
            )),
        }
    }
}
