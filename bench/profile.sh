#!/usr/bin/env bash
# Profiles the server under test while a benchmark runs.
#
#   bench/profile.sh NAME DELAY SECONDS -- BENCH_ARGS...
#
# Starts `streamhub bench BENCH_ARGS...` (release build), waits DELAY
# seconds, records the newest process the benchmark started (the server
# under test; run one target and one repetition) with `perf record -g` for
# SECONDS, and writes the hottest entries to bench/profiles/NAME.txt.
# Needs perf (Debian: apt-get install -y linux-perf).
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1 delay=$2 seconds=$3
shift 3
[[ "${1:-}" == "--" ]] && shift
bin="${CARGO_TARGET_DIR:-target}/release/streamhub"
out="bench/profiles/$name"
mkdir -p bench/profiles
"$bin" bench "$@" --out "/tmp/profile-$name.json" >"$out.bench.log" 2>&1 &
bench_pid=$!
sleep "$delay"
server_pid=$(pgrep -n -P "$bench_pid" || true)
if [[ -z "$server_pid" ]]; then
  echo "profile.sh: no server process under the benchmark (pid $bench_pid)" >&2
  wait "$bench_pid" || true
  exit 1
fi
echo "profiling pid $server_pid ($(tr '\0' ' ' </proc/"$server_pid"/cmdline | cut -c1-80)) for ${seconds}s"
perf record -F 499 -g -p "$server_pid" -o "/tmp/perf-$name.data" -- sleep "$seconds" 2>/dev/null
wait "$bench_pid" || true
{
  echo "# perf profile of the server under test: $name"
  echo "# benchmark: streamhub bench $*"
  echo "# perf record -F 499 -g -p PID for ${seconds}s after ${delay}s; self time, top entries"
  perf report -i "/tmp/perf-$name.data" --stdio --no-children --percent-limit 0.7 \
    --sort symbol -g none 2>/dev/null | grep -v '^$' | head -60
  echo
  echo "# by shared object"
  perf report -i "/tmp/perf-$name.data" --stdio --no-children --sort dso -g none 2>/dev/null \
    | grep -v '^#' | grep -v '^$' | head -12
} >"$out.txt"
echo "wrote $out.txt"
