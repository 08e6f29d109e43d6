#!/usr/bin/env bash
# On the GPU machine (the device tool's `run`, carry ["build-gpu"]): every GPU check and
# the GPU benchmark, in well under ten minutes, logs under $OUT (they come back).
#
#   bash scripts/gpu/run.sh                 # every check and a short benchmark (< 10 min)
#   bash scripts/gpu/run.sh --bench-only    # the full benchmark, a device call of its own
#
# Runs, each under its own timeout: the CUDA parity harness (every op of the CUDA
# backend against float64 and fused against composed), whole steps, probes and a 50-step
# curve against the CPU backend, the cuDNN attention graphs and their execution against
# float64 (capturing this device's description for engine/cuda/devices/), NCCL on one
# rank, compute-sanitizer memcheck on a training step, and scripts/bench/gpu.sh (the
# paper's 0.1B and 0.3B configs beside PyTorch). summary.txt has one line per check.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
b="$root/build-gpu"
OUT="${OUT:-$root/gpu-out}"
mkdir -p "$OUT"
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
{ nvidia-smi; echo; echo "bundle of commit $(cat "$b/commit" 2>/dev/null)"; echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"; } > "$OUT/machine.txt" 2>&1
for x in "$b"/bin/*; do echo "== $x"; ldd "$x" | grep -E "not found|cublas|cudnn|nccl"; done > "$OUT/ldd.txt" 2>&1

check() {  # check NAME SECONDS COMMAND...
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local verdict=ok
  if (( rc == 124 )); then verdict="TIMEOUT after ${limit}s"; elif (( rc != 0 )); then verdict="FAILED rc=$rc"; fi
  # On the GPU machine a test that skips for want of a device is a failure of the setup.
  if [[ $verdict == ok ]] && grep -qiE "no CUDA device" "$OUT/$name.log"; then verdict="NO DEVICE SEEN"; fi
  local skipped
  skipped="$(grep -c '\[  SKIPPED \]' "$OUT/$name.log" 2>/dev/null)"
  printf '%-16s %-22s %4ds  %s\n' "$name" "$verdict" $((SECONDS - start)) \
    "$(grep -E '^\[  (PASSED|FAILED) +\]' "$OUT/$name.log" | tr '\n' ' ')${skipped:+ skipped-lines $skipped}" | tee -a "$summary"
}

# The timeouts add up to 540 s, inside one 600 s device command. The benchmark here is
# the 0.1B config, 3 steps; the full one (0.1B and 0.3B) is a call of its own:
#   bash scripts/gpu/run.sh --bench-only        (about 10 minutes at most)
mode="${1:-all}"
if [[ $mode != --bench-only ]]; then
  check parity 60 "$b/bin/cuda_parity_test" --gtest_output="xml:$OUT/parity.xml"
  check step 90 "$b/bin/cuda_step_test" --gtest_output="xml:$OUT/step.xml"
  SINKSCOPE_DEVICE_JSON_OUT="$OUT/device.json" check cudnn 60 "$b/bin/cudnn_graph_test" --gtest_output="xml:$OUT/cudnn.xml"
  check nccl 30 "$b/bin/nccl_test" --gtest_output="xml:$OUT/nccl.xml"
  if command -v compute-sanitizer >/dev/null; then
    check memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 3 \
      "$b/bin/cuda_step_test" --gtest_filter='CudaStep.OneStep*'
  else
    echo "memcheck         SKIPPED: no compute-sanitizer on PATH" | tee -a "$summary"
  fi
  check bench 210 bash "$root/scripts/bench/gpu.sh" --bundle "$b" --out "$OUT" --models paper-0.1b --steps 3 --timeout 65
else
  check bench 560 bash "$root/scripts/bench/gpu.sh" --bundle "$b" --out "$OUT" --timeout 90
fi
echo "logs: $OUT"
! grep -qE 'FAILED|TIMEOUT|NO DEVICE' "$summary"
