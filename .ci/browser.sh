#!/usr/bin/env bash
# Installs what the dashboard's browser tests (tests/e2e/ui.rs) drive: Debian's chromium and its
# chromedriver. Idempotent: nothing to do (and no network) when both are there.
set -euo pipefail

log() { echo "[browser] $*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if [ -x /usr/bin/chromium ] && command -v chromedriver >/dev/null 2>&1; then
  log "chromium $(/usr/bin/chromium --version 2>/dev/null | awk '{print $2}') and chromedriver are installed"
  exit 0
fi
log "installing chromium and chromium-driver"
as_root apt-get update -qq
DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq chromium chromium-driver >/dev/null
log "installed: $(/usr/bin/chromium --version 2>/dev/null)"
