#!/usr/bin/env bash
# Makes sure Postgres (127.0.0.1:5432, user postgres, trust auth) and Redis (127.0.0.1:6379) are
# up: starts them if installed but stopped, installs them with apt if absent. Installs the `v2ray`
# binary (Debian's package; the xray-grpc tests start their own node from it). Idempotent.
set -euo pipefail

log() { echo "[services] $*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=false
apt_install() {
  if [ "$apt_updated" = false ]; then as_root apt-get update -qq; apt_updated=true; fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

postgres_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }

wait_for() {
  local what=$1 check=$2
  for _ in $(seq 1 60); do
    if $check; then log "$what is up"; return 0; fi
    sleep 0.5
  done
  log "$what did not come up"; return 1
}

# --- Postgres ---
installed_postgres=false
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  log "installing PostgreSQL"
  apt_install postgresql postgresql-client
  installed_postgres=true
fi
if ! postgres_up; then
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  if [ "$installed_postgres" = true ]; then
    # A fresh install asks for passwords over TCP; this machine's contract is trust on loopback.
    hba=/etc/postgresql/$version/main/pg_hba.conf
    as_root sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
  fi
  log "starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
fi
wait_for Postgres postgres_up

# --- Redis ---
if ! command -v redis-server >/dev/null 2>&1; then
  log "installing Redis"
  apt_install redis-server
fi
if ! redis_up; then
  log "starting Redis"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
wait_for Redis redis_up

# --- V2Ray (binary only: the e2e tests start their own nodes on free ports) ---
if ! command -v v2ray >/dev/null 2>&1; then
  log "installing V2Ray (Debian's v2ray package)"
  apt_install v2ray
fi
log "$(v2ray -version 2>/dev/null | head -n 1)"
