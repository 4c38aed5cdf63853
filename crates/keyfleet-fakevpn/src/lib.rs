//! An in-process simulator of a fleet of VPN servers (the V2Ray panel API, the Outline
//! management API, and the gRPC API of an Xray-core node) for tests, benchmarks and the demo.
//!
//! Invariant: the meter is honest. Every request a server receives is counted and logged, whatever
//! happens to it (bad auth, injected faults, cut connections), and a create that stores a second
//! user for an existing email/name is counted as a duplicate.

mod api;
mod config;
mod encoding;
mod endpoint;
mod faults;
mod fleet;
mod grpc;
mod hold;
mod meter;
mod net;
mod outline;
mod server;
mod tls;
mod v2ray;

pub use api::FakeUser;
pub use config::{DuplicatePolicy, FakeServerConfig, Latency};
pub use endpoint::Endpoint;
pub use faults::{Fault, FaultRates};
pub use fleet::FakeFleet;
pub use grpc::{FakeGrpcNode, GrpcFault};
pub use hold::Hold;
pub use keyfleet_core::ServerKind;
pub use meter::{LOG_CAP, LoggedRequest, MeterSnapshot};
pub use server::FakeServer;
