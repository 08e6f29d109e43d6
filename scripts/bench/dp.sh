#!/usr/bin/env bash
# Data-parallel scaling on the CPU: the quickstart model trained by sinkscope-train with
# --ranks 1 and --ranks 2 (one OpenMP thread per rank, Gloo over loopback), in one run:
# tokens/s of each, the speed-up, and the all-reduce time per step: with the gradients
# all-reduced in buckets while the backward runs (the default) and in one all-reduce after
# it, the time the step waited for them and the all-reduces' own time.
#
#   bash scripts/bench/dp.sh [--steps N]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
steps=20
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps="$2"; shift 2 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "dp.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
bash "$root/scripts/build.sh" >/dev/null
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
# The quickstart without probes or checkpoints in the timed steps: training alone.
sed -e 's/^  every: 50/  every: 0/' -e 's/^  every: 100/  every: 0/' -e 's/^  eval_every: 100/  eval_every: 0/' \
  -e 's/^arms: \[baseline, vscale\]/arms: [baseline]/' "$root/examples/quickstart.yaml" >"$out/dp.yaml"
run() {  # name, ranks, extra flags
  echo "sinkscope-train --ranks $2 $3 ($steps steps) ..." >&2
  OMP_NUM_THREADS=1 "$root/build/tools/sinkscope-train" "$out/dp.yaml" --steps "$steps" --ranks "$2" $3 \
    --out "$out/$1" --json >"$out/$1.json" 2>/dev/null
}
run r1 1 ""
run r2 2 ""
run r2small 2 "--allreduce-bucket-mb 0.25"
run r2after 2 "--allreduce-bucket-mb 0"
/usr/bin/python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
cases = [("r1", 1, "-"), ("r2", 2, "4 MB buckets, backward"), ("r2small", 2, "0.25 MB buckets, backward"),
         ("r2after", 2, "one after the backward")]
runs = {name: json.load(open(os.path.join(out, f"{name}.json")))["runs"][0] for name, _, _ in cases}
base = runs["r1"]["tokens_per_second"]
print("quickstart model (baseline arm), 2048 tokens per step, one OpenMP thread per rank, Gloo TCP on loopback")
print(f"{'ranks':>5} {'gradient all-reduce':>28} {'tokens/s':>10} {'speed-up':>9} {'waited ms/step':>15} "
      f"{'all-reduce ms/step':>19} {'final loss':>11}")
for name, n, how in cases:
    r = runs[name]
    print(f"{n:5d} {how:>28} {r['tokens_per_second']:10.0f} {r['tokens_per_second'] / base:8.2f}x "
          f"{1e3 * r['allreduce_seconds_per_step']:15.2f} {1e3 * r['allreduce_busy_seconds_per_step']:19.2f} "
          f"{r['final_loss']:11.6f}")
PY
