#!/usr/bin/env bash
# The GPU benchmark, on the GPU machine (scripts/gpu/run.sh calls it): sinkscope's CUDA
# backend on the paper's 0.1B and 0.3B configs (examples/paper-*.yaml, as
# `sinkscope-train --print-model` prints them into the bundle), tokens/s, MFU against the
# device table (H100/H200 dense bf16 989.4 TFLOP/s) and probe overhead at probe.every 100;
# then the same model in PyTorch on the same GPU in the same run (Hugging Face
# LlamaForCausalLM, SDPA, bf16 autocast, fused AdamW; eager and torch.compile), and the
# ratios. One JSON line per measurement in bench.jsonl, a table on stdout.
#
#   bash scripts/bench/gpu.sh [--bundle build-gpu] [--out DIR] [--steps N] [--micro-batch B]
#                             [--models "paper-0.1b paper-0.3b"] [--timeout S (each command)]
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bundle="$root/build-gpu" out="${OUT:-$root/gpu-out}" steps=5 B=8 models="paper-0.1b paper-0.3b" limit=240
while (( $# )); do
  case "$1" in
    --bundle) bundle="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --micro-batch) B="$2"; shift 2 ;;
    --models) models="$2"; shift 2 ;;
    --timeout) limit="$2"; shift 2 ;;
    *) echo "gpu.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
jsonl="$out/bench.jsonl"
: > "$jsonl"
for m in $models; do
  model="$bundle/models/$m.json"
  timeout "$limit" "$bundle/bin/sinkscope-bench-gpu" --model "$model" --label "$m" --micro-batch "$B" --steps "$steps" \
    --warmup 1 --json >> "$jsonl" 2> "$out/bench-$m.err" || echo "{\"model\": \"$m\", \"error\": \"sinkscope-bench-gpu failed, see bench-$m.err\"}" >> "$jsonl"
  for mode in eager compile; do
    timeout "$limit" python3 "$root/scripts/bench/torch_gpu_reference.py" --model "$model" --label "$m" --micro-batch "$B" \
      --steps "$steps" --mode "$mode" >> "$jsonl" 2> "$out/torch-$m-$mode.err" ||
      echo "{\"model\": \"$m\", \"torch_mode\": \"$mode\", \"error\": \"see torch-$m-$mode.err\"}" >> "$jsonl"
  done
done
python3 - "$jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by_model = {}
for r in rows:
    by_model.setdefault(r.get("model"), []).append(r)
for model, rs in by_model.items():
    ours = next((r for r in rs if "arms" in r), None)
    torch = {r["torch_mode"]: r for r in rs if "torch_mode" in r and "tokens_per_second" in r}
    print(f"== {model}")
    for r in rs:
        if "error" in r:
            print("   error:", r["error"])
    if ours:
        print(f"   sinkscope {ours['backend']} on {ours['device']}, B {ours['micro_batch']} x T {ours['context']}")
        for a in ours["arms"]:
            line = (f"   {a['arm']:<10} {a['tokens_per_second']:>10.0f} tok/s  MFU {100 * a['mfu']:5.2f}%  "
                    f"probe overhead {100 * a['probe_overhead']:5.2f}% @{ours['probe_every']}")
            for mode, t in torch.items():
                line += f"  x{a['tokens_per_second'] / t['tokens_per_second']:.2f} vs torch {mode}"
            print(line)
    for mode, t in torch.items():
        print(f"   torch {mode:<8} {t['tokens_per_second']:>10.0f} tok/s  MFU {100 * t['mfu']:5.2f}%  ({t['torch']})")
PY
! grep -q '"error"' "$jsonl"  # a measurement that failed fails the benchmark
