#!/usr/bin/env bash
# On the GPU machine (the device tool's `run`, carry ["build-gpu"]): every GPU check and a
# short benchmark in at most 6 minutes; the full benchmark is a call of its own.
#
#   bash scripts/gpu/run.sh                 # every check, then a 3-step 0.1B benchmark (<= 6 min)
#   bash scripts/gpu/run.sh --bench-only    # the full benchmark (0.1B and 0.3B, <= 10 min)
#
# The device tool brings back at most 8 files of $OUT, so $OUT holds only: summary.txt
# (one line per check, printed as each ends), device.json (this GPU as cuDNN describes it),
# bench.jsonl, and logs.tar.gz with everything else (each check's log and gtest XML,
# machine.txt, ldd.txt), written even when the command is stopped at its time limit.
# Most important first: whole steps and probes against the CPU (every arm), the parity
# harness, cuDNN attention against float64, NCCL, compute-sanitizer memcheck (skipped with
# its reason where the machine refuses it), then the benchmark.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
b="${SINKSCOPE_GPU_BUNDLE:-$root/build-gpu}"  # the carried bundle (tests point it elsewhere)
OUT="${OUT:-$root/gpu-out}"
mkdir -p "$OUT"
logs="$(mktemp -d)"  # every log; packed into $OUT/logs.tar.gz at the end, whatever ends the script
pack() { tar -czf "$OUT/logs.tar.gz" -C "$logs" . 2>/dev/null; }
trap pack EXIT
trap 'exit 143' TERM INT
test -x "$b/bin/cuda_parity_test" || { echo "run.sh: $b is missing: run scripts/gpu/bundle.sh here first and carry build-gpu" >&2; exit 2; }

# cuBLAS, cuDNN and NCCL come from the Python wheels under site-packages/nvidia/*/lib.
wheels="$(python3 - <<'PY' 2>/dev/null
import glob, os, site
dirs = []
for s in site.getsitepackages() + [site.getusersitepackages()]:
    dirs += sorted(glob.glob(os.path.join(s, "nvidia", "*", "lib")))
print(":".join(dirs))
PY
)"
export LD_LIBRARY_PATH="$b/lib${wheels:+:$wheels}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export SINKSCOPE_SOURCE_DIR="$root" OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
summary="$OUT/summary.txt"
: > "$summary"
{ nvidia-smi; echo; echo "bundle of commit $(cat "$b/commit" 2>/dev/null)"; echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"; } > "$logs/machine.txt" 2>&1
for x in "$b"/bin/*; do echo "== $x"; ldd "$x" | grep -E "not found|cublas|cudnn|nccl"; done > "$logs/ldd.txt" 2>&1

check() {  # check NAME SECONDS COMMAND...
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$logs/$name.log" 2>&1
  local rc=$?
  local verdict=ok
  if (( rc == 124 )); then verdict="TIMEOUT after ${limit}s"; elif (( rc != 0 )); then verdict="FAILED rc=$rc"; fi
  # On the GPU machine a test that skips for want of a device is a failure of the setup.
  if [[ $verdict == ok ]] && grep -qiE "no CUDA device" "$logs/$name.log"; then verdict="NO DEVICE SEEN"; fi
  # compute-sanitizer refusing this machine (no permission, an unsupported driver) is a
  # skip with its reason, not a failure of our code.
  if [[ $name == memcheck && $verdict != ok ]] &&
    grep -qiE "not supported|insufficient permission|permission denied|unable to (attach|initialize)|Target application terminated before first instrumented API call" "$logs/$name.log"; then
    verdict="SKIPPED"
    set -- "$(grep -m1 -iE "not supported|permission|unable to|terminated before" "$logs/$name.log" | cut -c1-120)"
  fi
  local skipped
  skipped="$(grep -c '\[  SKIPPED \]' "$logs/$name.log" 2>/dev/null)"
  local detail
  if [[ $verdict == SKIPPED ]]; then
    detail="compute-sanitizer refused: $1"
  else
    detail="$(grep -E '^\[  (PASSED|FAILED) +\]' "$logs/$name.log" | tr '\n' ' ')${skipped:+ skipped-lines $skipped}"
  fi
  printf '%-16s %-22s %4ds  %s\n' "$name" "$verdict" $((SECONDS - start)) "$detail" | tee -a "$summary"
}

# The timeouts add up to 335 s (the 6-minute budget, start-up included); the benchmark
# here is the 0.1B config, 3 steps; the full one is a call of its own (--bench-only).
mode="${1:-all}"
if [[ $mode != --bench-only ]]; then
  check step 50 "$b/bin/cuda_step_test" --gtest_output="xml:$logs/step.xml"
  check bf16 25 "$b/bin/cuda_bf16_step_test" --gtest_output="xml:$logs/bf16.xml"
  check parity 40 "$b/bin/cuda_parity_test" --gtest_output="xml:$logs/parity.xml"
  SINKSCOPE_DEVICE_JSON_OUT="$OUT/device.json" check cudnn 40 "$b/bin/cudnn_graph_test" --gtest_output="xml:$logs/cudnn.xml"
  check nccl 20 "$b/bin/nccl_test" --gtest_output="xml:$logs/nccl.xml"
  if command -v compute-sanitizer >/dev/null; then
    check memcheck 50 compute-sanitizer --tool memcheck --error-exitcode 3 \
      "$b/bin/cuda_step_test" --gtest_filter='CudaStep.OneStep*'
  else
    echo "memcheck         SKIPPED                   0s  no compute-sanitizer on PATH" | tee -a "$summary"
  fi
  check bench 110 bash "$root/scripts/bench/gpu.sh" --bundle "$b" --out "$logs/bench" --models paper-0.1b --steps 3 \
    --timeout 35 --compile-timeout 40
else
  check bench 560 bash "$root/scripts/bench/gpu.sh" --bundle "$b" --out "$logs/bench" --timeout 90 --compile-timeout 240
fi
[[ -f "$logs/bench/bench.jsonl" ]] && cp "$logs/bench/bench.jsonl" "$OUT/bench.jsonl"
echo "logs: $OUT/logs.tar.gz"
! grep -qE 'FAILED|TIMEOUT|NO DEVICE' "$summary"
