# keyfleet tasks. `just` lists them.

# List the recipes.
default:
    @just --list

# Start (or install) local Postgres and Redis.
services:
    bash .ci/services.sh

# Format the code.
fmt:
    cargo fmt --all

# Lint: formatting check and clippy with warnings as errors.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Run every test (needs Postgres and Redis on localhost).
test:
    cargo test --workspace

# Fuzz a running `keyfleet api` against its OpenAPI document (schemathesis, from PyPI).
api-fuzz:
    cargo build -p keyfleet
    bash .ci/schemathesis.sh

# Run the demo: 200 subscriptions on an embedded fake fleet of 10 V2Ray + 1 Outline servers + 1 Xray gRPC node.
demo:
    cargo run --release -p keyfleet -- demo

# Start Postgres, Redis, migrations and workers with Docker Compose.
up:
    docker compose -f deploy/compose.yaml up --build

# Run the benchmarks (figures in BENCHMARKS.md): the queue against stock apalis-redis and BullMQ
# (needs redis-server, node and npm: it starts Redis servers of its own and installs BullMQ from npm
# into target/tmp), sweeps and write-back against the naive way, then purchase latency through the
# API against the requests it cannot avoid, and one worker draining a 100,000-job backlog end to
# end against the same requests made directly (needs Postgres and Redis on localhost).
bench:
    cargo bench -p keyfleet --bench queue
    cargo bench -p keyfleet --bench sweeps
    cargo bench -p keyfleet --bench purchase
    cargo bench -p keyfleet --bench backlog
