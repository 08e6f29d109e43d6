#!/usr/bin/env bash
# The GPU benchmark, on the GPU machine (scripts/gpu/run.sh calls it): sinkscope's CUDA
# backend on the paper's 0.1B and 0.3B configs (examples/paper-*.yaml, as
# `sinkscope-train --print-model` prints them into the bundle), tokens/s, MFU against the
# device table (H100/H200 dense bf16 989.4 TFLOP/s) and probe overhead at probe.every 100;
# then the same model in PyTorch on the same GPU in the same run (Hugging Face
# LlamaForCausalLM, SDPA, bf16 autocast, fused AdamW; eager and torch.compile), and the
# ratios. One JSON line per measurement in bench.jsonl, a table on stdout. When the bundle
# holds the dry run's figures (dry-run.jsonl, scripts/gpu/bundle.sh), each arm's roofline
# estimate is printed beside its measurement.
#
#   bash scripts/bench/gpu.sh [--bundle build-gpu] [--out DIR] [--steps N] [--micro-batch B]
#                             [--models "paper-0.1b paper-0.3b"] [--timeout S (each command)]
#                             [--compile-timeout S (PyTorch torch.compile's run; default 240)]
#
# --dry-run, here without a GPU: builds nothing; for each model, writes its JSON with
# build/tools/sinkscope-train --print-model and runs build/scripts/bench/sinkscope-gpu-dry-run
# (one training step traced by the CUDA emulation, not executed, priced with an H100
# roofline: an estimate, README.md "The dry run"); micro-batch 16 unless --micro-batch.
#
#   bash scripts/bench/gpu.sh --dry-run [--build DIR (default build)] [--micro-batch B] [--models ...]
#                                       [--precision bf16|fp32 (default bf16, the training default)]
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bundle="$root/build-gpu" out="${OUT:-$root/gpu-out}" steps=5 B=8 models="paper-0.1b paper-0.3b" limit=240
compile_limit=240
dry_run=0 build="$root/build" dry_B=16 dry_precision=""
while (( $# )); do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --build) build="$2"; shift 2 ;;
    --bundle) bundle="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --micro-batch) B="$2"; dry_B="$2"; shift 2 ;;
    --models) models="$2"; shift 2 ;;
    --precision) dry_precision="$2"; shift 2 ;;
    --timeout) limit="$2"; shift 2 ;;
    --compile-timeout) compile_limit="$2"; shift 2 ;;
    *) echo "gpu.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
if (( dry_run )); then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  args=()
  for m in $models; do
    "$build/tools/sinkscope-train" "$root/examples/$m.yaml" --print-model > "$tmp/$m.json" || exit 1
    args+=(--model "$tmp/$m.json" --label "$m")
  done
  "$build/scripts/bench/sinkscope-gpu-dry-run" "${args[@]}" --micro-batch "$dry_B" ${dry_precision:+--precision "$dry_precision"}
  exit $?
fi
mkdir -p "$out"
jsonl="$out/bench.jsonl"
: > "$jsonl"
for m in $models; do
  model="$bundle/models/$m.json"
  timeout "$limit" "$bundle/bin/sinkscope-bench-gpu" --model "$model" --label "$m" --micro-batch "$B" --steps "$steps" \
    --warmup 1 --json >> "$jsonl" 2> "$out/bench-$m.err" || echo "{\"model\": \"$m\", \"error\": \"sinkscope-bench-gpu failed, see bench-$m.err\"}" >> "$jsonl"
  for mode in eager compile; do
    # torch.compile's warm-up (graph capture, Inductor, autotuning) takes minutes: its own
    # limit, and a compile that runs out of it is reported as a timeout of the reference,
    # not as a failure of sinkscope's checks.
    mode_limit="$limit"
    [[ $mode == compile ]] && mode_limit="$compile_limit"
    timeout "$mode_limit" python3 "$root/scripts/bench/torch_gpu_reference.py" --model "$model" --label "$m" \
      --micro-batch "$B" --steps "$steps" --mode "$mode" >> "$jsonl" 2> "$out/torch-$m-$mode.err"
    rc=$?
    if (( rc == 124 )); then
      echo "{\"model\": \"$m\", \"torch_mode\": \"$mode\", \"timed_out\": true, \"error\": \"PyTorch $mode did not finish within ${mode_limit}s (a timeout of the reference, not of sinkscope)\"}" >> "$jsonl"
    elif (( rc != 0 )); then
      echo "{\"model\": \"$m\", \"torch_mode\": \"$mode\", \"error\": \"see torch-$m-$mode.err\"}" >> "$jsonl"
    fi
  done
done
python3 - "$jsonl" "$bundle/dry-run.jsonl" <<'PY'
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
# The dry run's roofline estimates (scripts/gpu/bundle.sh), by model, arm and micro-batch.
est = {}
if os.path.exists(sys.argv[2]):
    for l in open(sys.argv[2]):
        if l.strip():
            e = json.loads(l)
            est[(e["model"], e["arm"], e["micro_batch"], e["seq"])] = e
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
            e = est.get((model, a["arm"], ours["micro_batch"], ours["context"]))
            if e:
                print(f"   {'':<10} {e['est_tokens_per_second']:>10.0f} tok/s  MFU {100 * e['est_mfu']:5.2f}%  "
                      f"roofline estimate of the dry run ({1e3 * e['est_s_per_step']:.1f} ms/step against "
                      f"{a['ms_per_step']:.1f} measured)")
    for mode, t in torch.items():
        print(f"   torch {mode:<8} {t['tokens_per_second']:>10.0f} tok/s  MFU {100 * t['mfu']:5.2f}%  ({t['torch']})")
PY
! grep -q '"error"' "$jsonl"  # a measurement that failed fails the benchmark
