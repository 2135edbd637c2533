#!/usr/bin/env bash
# Runs the whole benchmark suite with a release build, side by side against
# the reference peers and nats-server, writes bench/results/*.json, and
# regenerates bench/plots/*.png, bench/results/tables.md and the tables in
# BENCHMARKS.md.
#
#   bench/run-all.sh                 # the full suite (about 40 minutes)
#   bench/run-all.sh polling latency # only these scenarios
#   bench/run-all.sh security dashboard cluster  # issues 12, 13, 14
#   QUICK=1 bench/run-all.sh         # every scenario at a small scale (a few minutes)
#
# Environment: CARGO_TARGET_DIR (where cargo builds), REPS (repetitions,
# default 3), EXTRA (arguments added to every `streamhub bench`).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
command -v iperf3 >/dev/null 2>&1 || missing+=(iperf3)
if ((${#missing[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
bench/peers/setup.sh
cargo build --release
bin="${CARGO_TARGET_DIR:-target}/release/streamhub"

reps="${REPS:-3}"
# The polling scenario holds 1,000 connections per side, fan-out 100,000
# streams: raise the open-files limit as far as allowed.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

scenarios=("$@")
((${#scenarios[@]})) || scenarios=(polling fanout upload chat latency security dashboard cluster)
read -r -a extra <<<"${EXTRA:-}"

for scenario in "${scenarios[@]}"; do
  args=(--repetitions "$reps")
  if [[ "${QUICK:-0}" == 1 ]]; then
    case "$scenario" in
      polling) args+=(--clients 200 --duration 4 --quiet-duration 10 --warmup 1) ;;
      fanout) args+=(--subscribers 1000,10000 --rounds 3 --saturation 2) ;;
      upload) args+=(--upload-mib 128 --big-upload-mib 1024 --chunk-sizes 16KiB,64KiB,1MiB) ;;
      chat) args+=(--chat-rates 25,100,400 --step-seconds 2) ;;
      latency) args+=(--samples 200) ;;
      security) args+=(--subscribers 1000 --rounds 3 --saturation 2 --upload-mib 128 --chat-rates 100,400 --step-seconds 2) ;;
      dashboard) args+=(--dashboards 20 --services 200 --duration 4 --warmup 1) ;;
      cluster) args+=(--subscribers 1000 --per-connection 1000 --node-cpu-quota 0.2 --rounds 3 --saturation 2 --chat-rates 100 --step-seconds 2) ;;
    esac
  else
    case "$scenario" in
      polling) args+=(--duration 10 --quiet-duration 20) ;;
      fanout) args+=(--subscribers 1000,10000,100000 --rounds 5 --saturation 5) ;;
      # Issue 12: TLS + token against plaintext, alternating, same run.
      security) args+=(--subscribers 10000 --rounds 5 --saturation 5 --chat-rates 100,400,800,1600) ;;
      # Issue 13: 100 dashboards x 1,000 services at 1 Hz.
      dashboard) args+=(--dashboards 100 --services 1000 --duration 10) ;;
      # Issue 14: 10,000 subscribers and a chat room over 3 nodes vs 1.
      cluster) args+=(--subscribers 10000 --per-connection 1000 --node-cpu-quota 0.2 --rounds 5 --saturation 5 --chat-rates 100,400) ;;
    esac
  fi
  echo "== streamhub bench $scenario ${args[*]} ${extra[*]}"
  "$bin" bench "$scenario" "${args[@]}" "${extra[@]}" --out "bench/results/$scenario.json"
done

bench/plot.sh
python3 bench/tables.py > bench/results/tables.md
python3 bench/tables.py --splice BENCHMARKS.md
echo "tables: bench/results/tables.md (and spliced into BENCHMARKS.md); plots: bench/plots/"
