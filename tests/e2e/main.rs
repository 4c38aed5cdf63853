//! End-to-end tests: the real `keyfleet` binary against real Postgres and Redis and the project's
//! fake VPN fleet. Each test gets its own database and Redis key prefix.

mod api;
mod browser;
mod cli;
mod cluster;
mod deploy;
mod guarantees;
mod harness;
mod observe;
mod provision;
mod resilience;
mod retries;
mod support;
mod sweeps;
mod trust;
mod ui;
mod xray;
