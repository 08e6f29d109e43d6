#!/usr/bin/env bash
# A bounded load test on loopback: starts sinkscope-coordinator with a fresh SQLite store
# in a temporary folder, runs sinkscope-load-test against it (simulated workers streaming
# progress at 10 Hz plus probe reports) and prints the table: sustained ingest rate,
# send->stored latency, the coordinator's peak memory and the count lost (must be 0).
#
#   bash scripts/bench/load.sh [sinkscope-load-test options]     e.g. --workers 200 --seconds 30
#
# SINKSCOPE_BUILD_DIR: the build folder (default build/). Exits non-zero if anything was lost.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${SINKSCOPE_BUILD_DIR:-$root/build}"
tmp="$(mktemp -d /tmp/sinkscope-load-XXXXXX)"
coordinator_pid=""
cleanup() {
  if [[ -n "$coordinator_pid" ]] && kill -0 "$coordinator_pid" 2>/dev/null; then
    kill -TERM "$coordinator_pid" 2>/dev/null || true
    wait "$coordinator_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# A corpus the coordinator can read (the simulated workers never train on it).
for i in $(seq 1 200); do echo "document $i of the load test corpus"; echo "%"; done > "$tmp/corpus.txt"

${SINKSCOPE_LOAD_WRAP:-} "$build/server/sinkscope-coordinator" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --db "$tmp/store.db" \
  --checkpoint-root "$tmp/checkpoints" --lease-seconds 60 --heartbeat-seconds 5 > "$tmp/coordinator.log" 2>&1 &
coordinator_pid=$!
for _ in $(seq 1 300); do
  grep -q "listening" "$tmp/coordinator.log" 2>/dev/null && break
  kill -0 "$coordinator_pid" 2>/dev/null || { cat "$tmp/coordinator.log" >&2; exit 1; }
  sleep 0.1
done
port="$(sed -n 's/.*listening grpc=\([0-9]*\).*/\1/p' "$tmp/coordinator.log" | head -1)"
[[ -n "$port" ]] || { echo "load.sh: the coordinator did not start" >&2; cat "$tmp/coordinator.log" >&2; exit 1; }

status=0
"$build/scripts/bench/sinkscope-load-test" --coordinator "127.0.0.1:$port" --data "$tmp/corpus.txt" \
  --db "$tmp/store.db" --coordinator-pid "$coordinator_pid" "$@" || status=$?
if grep -q "level=error" "$tmp/coordinator.log"; then
  echo "load.sh: the coordinator logged errors:" >&2
  grep "level=error" "$tmp/coordinator.log" | head -5 >&2
fi
exit "$status"
