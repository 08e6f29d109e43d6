#!/usr/bin/env bash
# sinkscope-gpu-dry-run on the quickstart model and on paper-0.1b at its paper shape
# (micro-batch 16, T 1024), as `sinkscope-train --print-model` writes them: one training
# step traced by the CUDA emulation without executing. Fails if a launch is refused or has
# no declared cost, if the summary line is missing, if the GEMM FLOPs traced are not the
# model's 6·N_matmul per token, or if a kernel of the 0.1B step launches fewer blocks than
# an H100 has SMs (132) without being on the list of small-work launches below.
# (scripts/bench/README.md, "The dry run".)
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
# Issue 25 item 4: at the 0.1B shape every kernel fills the 132 SMs unless its work is
# smaller: the second passes of reductions (a few thousand values) and, until the LM head is
# fused and chunked evenly (item 5), cross-entropy's last chunk of rows.
/usr/bin/python3 - "$tmp/out.txt" <<'PY'
import sys
small_work = {"ColumnPartialsSumKernel (elementwise.cu)", "SumPartialsKernel (elementwise.cu)",
              "ThetaSumKernel (vscale.cu)", "ColumnStatsMeanKernel (attention.cu)", "RowKernel (cross_entropy.cu)"}
section, bad, seen = None, [], 0
for line in open(sys.argv[1]):
    if line.startswith("== "):
        section = line.split()[1]
        continue
    if section != "paper-0.1b" or line.startswith(("op ", "per step", "estimate", "with ", "device", "probed", "blocks", "host")):
        continue
    # (the unit column "bf16 TC" is one column of two words)
    name, rest = line[:92].rstrip(), line[92:].replace("bf16 TC", "bf16-TC").split()
    if len(rest) < 3 or rest[2] == "-":
        continue
    seen += 1
    if int(rest[2]) < 132 and name not in small_work:
        bad.append(f"{name}: {rest[2]} blocks")
assert seen > 10, f"no kernel rows read for paper-0.1b ({seen})"
assert not bad, "kernels under 132 blocks at paper-0.1b: " + "; ".join(bad)
print(f"gpu_dry_run_smoke: {seen} kernels of the paper-0.1b step fill an H100's 132 SMs or are small work")
PY
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
# The probed step costs more than the same step unprobed, traced warm just before it.
assert r["est_probed_step_s"] > r["est_warm_step_s"] > 0, (r["est_probed_step_s"], r["est_warm_step_s"])
assert r["probed_step_launches"] > r["launches"] // 2, r["probed_step_launches"]
# 6·N_matmul per token: forward 2·in·out per linear, backward twice that, the LM head included.
L, d, H, KV, dh, F, V = (m[k] for k in ("layers", "d_model", "heads", "kv_heads", "head_dim", "ffn", "vocab"))
n_matmul = L * (d * H * dh + 2 * d * KV * dh + H * dh * d + 3 * d * F) + d * V
tokens = r["micro_batch"] * r["seq"]
want = 6 * n_matmul * tokens
assert abs(r["gemm_flops"] - want) <= 1e-6 * want, (r["gemm_flops"], want)
assert r["summary"].startswith("quickstart: roofline estimate "), r["summary"]
print("gpu_dry_run_smoke:", r["summary"])
PY
