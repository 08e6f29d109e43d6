#!/usr/bin/env bash
# sinkscope-gpu-dry-run on the quickstart model and on paper-0.1b at its paper shape
# (micro-batch 16, T 1024), as `sinkscope-train --print-model` writes them: one training
# step traced by the CUDA emulation without executing. Fails if a launch is refused or has
# no declared cost, if the summary line is missing, or if the GEMM FLOPs traced are not
# the model's 6·N_matmul per token. (scripts/bench/README.md, "The dry run".)
set -euo pipefail
b="${SINKSCOPE_BUILD_DIR:?}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for m in quickstart paper-0.1b; do
  "$b/tools/sinkscope-train" "$root/examples/$m.yaml" --print-model > "$tmp/$m.json"
done
dry="$b/scripts/bench/sinkscope-gpu-dry-run"
"$dry" --model "$tmp/quickstart.json" --model "$tmp/paper-0.1b.json" > "$tmp/out.txt" || {
  cat "$tmp/out.txt"
  echo "gpu_dry_run_smoke: sinkscope-gpu-dry-run failed" >&2
  exit 1
}
cat "$tmp/out.txt"
for m in quickstart paper-0.1b; do
  grep -qE "^$m: roofline estimate [0-9]+\.[0-9]+ s/step, MFU [0-9]+% \(an estimate, not a measurement\)$" "$tmp/out.txt" || {
    echo "gpu_dry_run_smoke: no summary line for $m" >&2
    exit 1
  }
done
if grep -q "no declared cost" "$tmp/out.txt"; then
  echo "gpu_dry_run_smoke: a launch has no declared cost (SINKSCOPE_COST beside SINKSCOPE_LAUNCH)" >&2
  exit 1
fi
# The JSON form, and the traced GEMMs against the model's own FLOP count.
"$dry" --model "$tmp/quickstart.json" --label quickstart --micro-batch 2 --seq 64 --json > "$tmp/out.json"
/usr/bin/python3 - "$tmp/out.json" "$tmp/quickstart.json" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).read())
m = json.load(open(sys.argv[2]))
assert r["estimate"] is True and r["uncosted"] == [], r["uncosted"]
assert r["launches"] > 0 and r["gemms"] > 0 and r["bytes"] > 0 and r["est_s_per_step"] > 0, r
assert 0 < r["est_mfu"] < 1, r["est_mfu"]
assert sum(o["launches"] for o in r["ops"]) == r["launches"]
# 6·N_matmul per token: forward 2·in·out per linear, backward twice that, the LM head included.
L, d, H, KV, dh, F, V = (m[k] for k in ("layers", "d_model", "heads", "kv_heads", "head_dim", "ffn", "vocab"))
n_matmul = L * (d * H * dh + 2 * d * KV * dh + H * dh * d + 3 * d * F) + d * V
tokens = r["micro_batch"] * r["seq"]
want = 6 * n_matmul * tokens
assert abs(r["gemm_flops"] - want) <= 1e-6 * want, (r["gemm_flops"], want)
assert r["summary"].startswith("quickstart: roofline estimate "), r["summary"]
print("gpu_dry_run_smoke:", r["summary"])
PY
