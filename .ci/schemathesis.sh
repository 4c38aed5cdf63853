#!/usr/bin/env bash
# Fuzzes a running `keyfleet api` against its own OpenAPI document with schemathesis: no 5xx, and
# every response (status, content type, headers, body) as the document says.
# Needs Postgres and Redis on localhost and a built `target/debug/keyfleet` (cargo build).
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
venv="${SCHEMATHESIS_VENV:-$HOME/.cache/keyfleet/schemathesis-$SCHEMATHESIS_VERSION}"
if [ ! -x "$venv/bin/schemathesis" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
fi

bin=target/debug/keyfleet
[ -x "$bin" ] || cargo build -p keyfleet
db="kf_schemathesis_$$"
base_url="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
psql "$base_url" -q -c "CREATE DATABASE $db"
export DATABASE_URL="${base_url%/*}/$db"
export KEYFLEET_REDIS_PREFIX="kfschemathesis$$"
# Fuzzing sends thousands of requests with one token; the rate limit has its own e2e test.
export KEYFLEET_API_RATE_PER_SEC=100000 KEYFLEET_API_RATE_BURST=100000
log=$(mktemp)
out=$(mktemp)
cleanup() {
    [ -n "${api_pid:-}" ] && kill "$api_pid" 2>/dev/null && wait "$api_pid" 2>/dev/null || true
    psql "$base_url" -q -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
    redis-cli --scan --pattern "*$KEYFLEET_REDIS_PREFIX*" | xargs -r redis-cli del >/dev/null || true
    rm -f "$out"
}
trap cleanup EXIT

"$bin" migrate >/dev/null
# A server for the operations on /v1/servers/{name} (the document's example name); nothing listens
# at its URL, and no worker runs: provisions answer 202 after their wait.
"$bin" server add --name de-1 --kind v2ray --api-url http://127.0.0.1:9 --api-key not-a-secret >/dev/null
token=$("$bin" token create --name schemathesis --role admin | tail -1)
RUST_LOG=warn "$bin" api --listen 127.0.0.1:0 >"$out" 2>"$log" &
api_pid=$!
for _ in $(seq 200); do
    grep -q "listening on" "$out" && break
    sleep 0.05
done
addr=$(sed -n 's/^keyfleet api listening on //p' "$out")
[ -n "$addr" ] || { echo "keyfleet api did not start:"; cat "$log"; exit 1; }

status=0
PYTHONPATH=.ci SCHEMATHESIS_HOOKS=schemathesis_hooks "$venv/bin/schemathesis" run "$addr/v1/openapi.json" \
    --header "Authorization: Bearer $token" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance \
    --max-examples "${SCHEMATHESIS_MAX_EXAMPLES:-50}" \
    --seed 1 \
    --no-color || status=$?
if grep -q '"level":"ERROR"\|ERROR' "$log"; then
    echo "keyfleet api logged errors during the run:"
    grep 'ERROR' "$log" | head -20
    status=1
fi
rm -f "$log"
exit $status
