#!/usr/bin/env bash
# Regenerates the gRPC-Web client code from ../proto and rebuilds dist/.
# Needs only Node and npm (npm ci installs esbuild and buf from the registry).
set -euo pipefail
cd "$(dirname "$0")"
[[ -d node_modules ]] || npm ci --no-audit --no-fund
npm run gen
npm run build
