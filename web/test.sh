#!/usr/bin/env bash
# The dashboard's part of the test command (called by scripts/test):
# installs what the browser tests need if it is missing (Debian's chromium,
# the npm packages pinned by web/package-lock.json), fails if the committed
# bundle or generated client code is stale, builds the server binary and
# runs the browser tests (node --test web/test/*.test.mjs). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi

# npm ci only when package-lock.json changed since the last install.
lock_sum=$(sha256sum web/package-lock.json | cut -d' ' -f1)
if [[ "$(cat web/node_modules/.streamhub-lock 2>/dev/null)" != "$lock_sum" ]]; then
  (cd web && npm ci --no-audit --no-fund --loglevel=error)
  echo "$lock_sum" >web/node_modules/.streamhub-lock
fi

(cd web && npm run --silent check)
cargo build --quiet
node --test --test-timeout=120000 web/test/*.test.mjs
