#!/usr/bin/env bash
# The main job: installs dependencies, builds, starts a coordinator and a worker on
# loopback, submits examples/quickstart.yaml (baseline vs V-scale on the CPU), watches it
# live, prints the comparison of the arms and writes the report of the paper's figures.
# Everything is kept under runs/demo/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
# Only what the demo runs; the tests' build belongs to scripts/test.sh.
# A Release unity build: the demo starts in about 5 minutes from a fresh clone on 2 cores.
SINKSCOPE_BUILD_TARGETS="sinkscope-coordinator sinkscope-worker sinkscope" bash "$root/scripts/build.sh" \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_UNITY_BUILD=ON -DCMAKE_UNITY_BUILD_BATCH_SIZE=3
cd "$root"

demo="$root/runs/demo"
mkdir -p "$demo"
metrics_port="${SINKSCOPE_DEMO_METRICS_PORT:-0}"
bin="$root/build"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# Port 0 unless told otherwise: the coordinator picks free ports and prints them.
"$bin/server/sinkscope-coordinator" --listen "127.0.0.1:${SINKSCOPE_DEMO_PORT:-0}" \
  --metrics-listen "127.0.0.1:$metrics_port" --db "$demo/store.db" --checkpoint-root "$demo/checkpoints" \
  >"$demo/coordinator.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q listening "$demo/coordinator.log" && break; sleep 0.1; done
grep -q listening "$demo/coordinator.log" || { cat "$demo/coordinator.log"; exit 1; }
grpc_port="$(sed -n 's/.*listening grpc=\([0-9]*\).*/\1/p' "$demo/coordinator.log" | head -1)"
metrics_port="$(sed -n 's/.*listening grpc=[0-9]* metrics=\([0-9]*\).*/\1/p' "$demo/coordinator.log" | head -1)"
address="127.0.0.1:$grpc_port"
"$bin/worker/sinkscope-worker" --coordinator "$address" --worker-id demo-worker >"$demo/worker.log" 2>&1 &
pids+=($!)

echo "coordinator on $address (Prometheus metrics on 127.0.0.1:$metrics_port/metrics), one CPU worker; logs in $demo"
cli=("$bin/client/sinkscope" --coordinator "$address")
id="$("${cli[@]}" --json submit examples/quickstart.yaml | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["experiment_id"])')"
echo "submitted $id"
"${cli[@]}" watch "$id"
echo
"${cli[@]}" compare "$id"
echo
"${cli[@]}" export "$id" --format csv --out "$demo/$id.csv"
"${cli[@]}" export "$id" --format jsonl --out "$demo/$id.jsonl"
echo
"${cli[@]}" report "$id" --out "$demo/report"
echo "open $demo/report/index.html to see the paper's figures for this experiment"
echo "to look again later: build/server/sinkscope-coordinator --db $demo/store.db --listen 127.0.0.1:50051 &"
echo "                     build/client/sinkscope --coordinator 127.0.0.1:50051 compare $id"
