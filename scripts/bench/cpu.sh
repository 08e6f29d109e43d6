#!/usr/bin/env bash
# CPU training throughput in one run: sinkscope-bench-cpu (the quickstart model on the
# CPU backend, beside this machine's sgemm rate) and the same model trained by PyTorch on
# the same machine (scripts/bench/torch_reference.py, Debian's python3-torch, installed
# here if missing), with the ratio.
#
#   bash scripts/bench/cpu.sh [--steps N] [--warmup N]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
steps=20 warmup=3
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps="$2"; shift 2 ;;
    --warmup) warmup="$2"; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "cpu.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
py=/usr/bin/python3
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "cpu.sh: installing python3-torch (the PyTorch reference) with apt-get" >&2
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends python3-torch >/dev/null
fi
bash "$root/scripts/build.sh" >/dev/null
threads="${OMP_NUM_THREADS:-$(nproc)}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
echo "sinkscope-bench-cpu ($steps steps after $warmup warm-up, per arm) ..." >&2
"$root/build/scripts/bench/sinkscope-bench-cpu" --steps "$steps" --warmup "$warmup" --json >"$out/sinkscope.json"
# PyTorch at one thread and at the machine's; the faster is the reference.
for t in 1 "$threads"; do
  echo "PyTorch, $t thread(s) ..." >&2
  "$py" "$root/scripts/bench/torch_reference.py" --steps "$steps" --warmup "$warmup" --threads "$t" >"$out/torch-$t.json"
done
"$py" - "$out" "$threads" <<'PY'
import glob, json, os, sys
out, threads = sys.argv[1], sys.argv[2]
s = json.load(open(os.path.join(out, "sinkscope.json")))
torch_runs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "torch-*.json")))]
print(f"quickstart model, {s['steps']} timed steps of 2048 tokens; sinkscope OpenMP {threads} threads; "
      f"sgemm peak {s['peak_gflops']:.1f} GFLOP/s (measured in this run)")
print(f"{'arm':10} {'sinkscope tok/s':>15} {'ms/step':>8} {'MFU':>6}   {'PyTorch tok/s':>13} {'threads':>7} {'ms/step':>8}   {'ratio':>6}")
for arm in s["arms"]:
    name = arm["arm"]
    best = max(((r["threads"], a) for r in torch_runs for a in r["arms"] if a["arm"] == name),
               key=lambda x: x[1]["tokens_per_second"])
    ratio = arm["tokens_per_second"] / best[1]["tokens_per_second"]
    print(f"{name:10} {arm['tokens_per_second']:15.0f} {arm['ms_per_step']:8.1f} {100 * arm['mfu']:5.1f}%   "
          f"{best[1]['tokens_per_second']:13.0f} {best[0]:7d} {best[1]['ms_per_step']:8.1f}   {ratio:5.2f}x")
for r in torch_runs:
    per = ", ".join(f"{a['arm']} {a['tokens_per_second']:.0f} tok/s" for a in r["arms"])
    print(f"  PyTorch {r['torch']} at {r['threads']} thread(s): {per}")
print("ratio: sinkscope tokens/s ÷ the faster PyTorch run's; MFU: METRICS.md convention against the sgemm peak")
PY
