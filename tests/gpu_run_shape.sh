#!/usr/bin/env bash
# scripts/gpu/run.sh's shape, which decides what a scarce GPU call brings back: run here
# over a bundle whose test binaries are stand-ins that print gtest's summary lines (the
# real checks can only run on a GPU), it must leave at most 8 files in $OUT (the device
# tool's limit) with the logs in logs.tar.gz, print one summary line per check, report a
# compute-sanitizer that refuses the machine as SKIPPED with its reason (not a failure),
# and report a check that fails as FAILED with a non-zero exit.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/bundle/bin" "$tmp/bundle/models" "$tmp/path"
for t in cuda_step_test cuda_bf16_step_test cuda_parity_test cudnn_graph_test nccl_test sinkscope-bench-gpu; do
  printf '#!/bin/sh\necho "[==========] 3 tests ran."\necho "[  PASSED  ] 3 tests."\n' > "$tmp/bundle/bin/$t"
  chmod +x "$tmp/bundle/bin/$t"
done
printf '#!/bin/sh\necho "========= Error: Target application terminated before first instrumented API call"\nexit 1\n' \
  > "$tmp/path/compute-sanitizer"
chmod +x "$tmp/path/compute-sanitizer"
echo '{}' > "$tmp/bundle/models/paper-0.1b.json"

out="$tmp/out"
rc=0
PATH="$tmp/path:$PATH" OUT="$out" SINKSCOPE_GPU_BUNDLE="$tmp/bundle" bash "$root/scripts/gpu/run.sh" > "$tmp/stdout" 2>&1 || rc=$?
cat "$tmp/stdout"
fail() { echo "gpu_run_shape: $*" >&2; exit 1; }
files=$(find "$out" -type f | wc -l)
(( files <= 8 )) || fail "$files files in \$OUT, the device tool brings back 8: $(ls "$out")"
[[ -f "$out/logs.tar.gz" ]] || fail "no logs.tar.gz"
# Listed to a file first: `tar | grep -q` under pipefail fails when grep's early exit
# makes tar die of SIGPIPE (a flaky "lacks" with the log present).
tar -tzf "$out/logs.tar.gz" > "$tmp/listing" || fail "logs.tar.gz does not list"
grep -q "step.log" "$tmp/listing" || fail "logs.tar.gz lacks the step check's log"
for name in step bf16 parity cudnn nccl memcheck bench; do
  grep -qE "^$name " "$out/summary.txt" || fail "summary.txt has no line for $name"
done
grep -qE '^memcheck +SKIPPED .*compute-sanitizer refused: .*terminated before first instrumented' "$out/summary.txt" ||
  fail "a compute-sanitizer that refuses the machine is not a skip with its reason: $(grep memcheck "$out/summary.txt")"
grep -qE '^step +ok ' "$out/summary.txt" || fail "the step check is not ok: $(grep '^step' "$out/summary.txt")"
# The first check must be the whole step against the CPU (the most important).
[[ "$(head -1 "$out/summary.txt" | cut -d' ' -f1)" == step ]] || fail "the first check is not step"

# A failing check: FAILED in the summary and a non-zero exit.
printf '#!/bin/sh\necho "[  FAILED  ] 1 test."\nexit 1\n' > "$tmp/bundle/bin/nccl_test"
rm -rf "$out"
rc=0
PATH="$tmp/path:$PATH" OUT="$out" SINKSCOPE_GPU_BUNDLE="$tmp/bundle" bash "$root/scripts/gpu/run.sh" > "$tmp/stdout" 2>&1 || rc=$?
(( rc != 0 )) || fail "a failed check exited 0"
grep -qE '^nccl +FAILED rc=1' "$out/summary.txt" || fail "the failed check is not FAILED: $(grep '^nccl' "$out/summary.txt")"
echo "gpu_run_shape: ok ($files files in \$OUT)"
