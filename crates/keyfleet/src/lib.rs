//! keyfleet as a library: the producer (record intent, enqueue jobs), the worker (claim, execute,
//! write back), settings and the embedded demo. The `keyfleet` binary is a thin CLI over this.

pub mod api;
pub mod demo;
pub mod dlq;
pub mod observe;
pub mod producer;
pub mod reconcile;
pub mod recovery;
pub mod schedule;
pub mod scheduler;
pub mod servers;
pub mod settings;
pub mod sweeps;
pub mod telemetry;
pub mod worker;
