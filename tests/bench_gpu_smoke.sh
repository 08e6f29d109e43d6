#!/usr/bin/env bash
# sinkscope-bench-gpu on the CPU with the quickstart model, as `sinkscope-train
# --print-model` writes it: both arms train, the figures are positive and the MFU is a
# fraction. (Its GPU figures come from scripts/bench/gpu.sh on a GPU machine.)
set -euo pipefail
b="${SINKSCOPE_BUILD_DIR:?}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$b/tools/sinkscope-train" "$root/examples/quickstart.yaml" --print-model > "$tmp/model.json"
"$b/scripts/bench/sinkscope-bench-gpu" --model "$tmp/model.json" --device cpu --micro-batch 2 --steps 2 --warmup 0 \
  --json > "$tmp/out.json"
/usr/bin/python3 - "$tmp/out.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert [a["arm"] for a in r["arms"]] == ["baseline", "vscale"], r
for a in r["arms"]:
    assert a["tokens_per_second"] > 0 and 0 < a["mfu"] < 1, a
    assert a["plain_median_ms"] > 0 and a["probed_median_ms"] > 0, a
assert r["peak_from"] == "measured GEMM rate" and r["peak_flops"] > 0, r
print("bench_gpu_smoke:", json.dumps(r))
PY
# A device that is not there is an error naming it, not a hang or a crash.
if "$b/scripts/bench/sinkscope-bench-gpu" --model "$tmp/model.json" --device cuda:7 2> "$tmp/err"; then
  echo "bench_gpu_smoke: --device cuda:7 succeeded on a machine without it" >&2
  exit 1
fi
grep -q "cuda:7" "$tmp/err" || { cat "$tmp/err" >&2; exit 1; }
