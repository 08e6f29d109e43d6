#!/usr/bin/env bash
# The main job: installs dependencies, builds, starts a coordinator and a worker on
# loopback, submits examples/quickstart.yaml (baseline vs V-scale on the CPU), watches it
# live and prints the comparison of the arms. Everything is kept under runs/demo/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
bash "$root/scripts/build.sh"
cd "$root"

demo="$root/runs/demo"
mkdir -p "$demo"
free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
grpc_port="${SINKSCOPE_DEMO_PORT:-$(free_port)}"
metrics_port="$(free_port)"
address="127.0.0.1:$grpc_port"
bin="$root/build"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

"$bin/server/sinkscope-coordinator" --listen "$address" --metrics-listen "127.0.0.1:$metrics_port" \
  --db "$demo/store.db" --checkpoint-root "$demo/checkpoints" >"$demo/coordinator.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q listening "$demo/coordinator.log" && break; sleep 0.1; done
grep -q listening "$demo/coordinator.log" || { cat "$demo/coordinator.log"; exit 1; }
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
echo "export the numbers with: build/client/sinkscope --coordinator $address export $id --format csv"
