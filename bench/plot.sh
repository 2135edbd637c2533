#!/usr/bin/env bash
# Installs matplotlib into bench/.venv (once) and turns bench/results/*.json
# into bench/plots/*.png.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import matplotlib" 2>/dev/null; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "matplotlib>=3.7,<4"
fi
"$venv/bin/python" "$here/plot.py" "$@"
