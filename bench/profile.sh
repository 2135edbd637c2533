#!/usr/bin/env bash
# Profiles the server under test while a benchmark runs.
#
#   bench/profile.sh NAME DELAY SECONDS -- BENCH_ARGS...
#
# Starts `streamhub bench BENCH_ARGS...` (release build), waits DELAY
# seconds, records the newest server process the benchmark started (the
# server under test; run one target and one repetition) with `perf record -g` for
# SECONDS (at PERF_FREQ Hz, default 499), and writes the hottest entries
# to bench/profiles/NAME.txt. With PROFILE=load it records the load
# generator (the `streamhub bench` process itself) instead.
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
# The newest child that is a server (not iperf3 or dd), waiting up to 60 s.
server_pid=""
for _ in $(seq 600); do
  server_pid=$(pgrep -n -P "$bench_pid" || true)
  if [[ -n "$server_pid" ]] && grep -qaE "serve|server" "/proc/$server_pid/cmdline" 2>/dev/null; then
    break
  fi
  server_pid=""
  sleep 0.1
done
if [[ "${PROFILE:-server}" == load ]]; then
  server_pid=$bench_pid
fi
if [[ -z "$server_pid" ]]; then
  echo "profile.sh: no server process under the benchmark (pid $bench_pid)" >&2
  wait "$bench_pid" || true
  exit 1
fi
echo "profiling pid $server_pid ($(tr '\0' ' ' </proc/"$server_pid"/cmdline | cut -c1-80)) for ${seconds}s"
freq="${PERF_FREQ:-499}"
perf record -F "$freq" -g -p "$server_pid" -o "/tmp/perf-$name.data" -- sleep "$seconds" 2>/dev/null || true
wait "$bench_pid" || true
{
  echo "# perf profile of the ${PROFILE:-server} process: $name"
  echo "# benchmark: streamhub bench $*"
  echo "# perf record -F $freq -g -p PID for ${seconds}s after ${delay}s; self time, top entries"
  perf report -i "/tmp/perf-$name.data" --stdio --no-children --percent-limit 0.7 \
    --sort symbol -g none 2>/dev/null | grep -v '^$' | cut -c1-160 | head -60 || true
  echo
  echo "# by shared object"
  perf report -i "/tmp/perf-$name.data" --stdio --no-children --sort dso -g none 2>/dev/null \
    | grep -v '^#' | grep -v '^$' | head -12 || true
} >"$out.txt"
echo "wrote $out.txt"
