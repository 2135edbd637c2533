#!/usr/bin/env bash
# Installs what the reference peers need; safe to run again at any time.
#   - python/.venv : a virtualenv with the pinned grpcio / grpcio-tools
#   - python/gen/  : Python stubs generated from proto/ (git-ignored)
#   - node/node_modules : exactly what node/package-lock.json pins (npm ci)
# Needs only python3 (3.11, with venv and pip) and node 20 with npm.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="$here/python"
venv="$py/.venv"

# Python: create the venv once, then (re)install the pinned requirements;
# pip does nothing when they are already satisfied.
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv" || {
    echo "setup.sh: 'python3 -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2
    exit 1
  }
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  -r "$py/requirements.txt"

# Python stubs: regenerate from scratch so they always match proto/.
rm -rf "$py/gen"
mkdir -p "$py/gen"
"$venv/bin/python" -m grpc_tools.protoc \
  --proto_path="$here/proto" \
  --python_out="$py/gen" \
  --grpc_python_out="$py/gen" \
  "$here"/proto/*.proto

# Node: npm ci is idempotent by design (it wipes and reinstalls node_modules
# from the lock file); skip it when node_modules already matches the lock.
node_dir="$here/node"
if ! cmp -s "$node_dir/package-lock.json" "$node_dir/node_modules/.setup-package-lock.json" 2>/dev/null; then
  (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error)
  cp "$node_dir/package-lock.json" "$node_dir/node_modules/.setup-package-lock.json"
fi

echo "setup.sh: peers ready (see README.md to run them)"
