#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/) with clang, AddressSanitizer and libFuzzer in their
# own build folder, and runs each for a bounded time from the seed corpus.
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 60)
#
# Environment: SINKSCOPE_FUZZ_BUILD_DIR (default build-fuzz), SINKSCOPE_FUZZ_JOBS (make
# jobs, default 1). A crash, a leak or a sanitizer report fails the script; the input is
# left in the build folder (crash-*, leak-*) and named in the output.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seconds="${1:-60}"
build="${SINKSCOPE_FUZZ_BUILD_DIR:-$root/build-fuzz}"
jobs="${SINKSCOPE_FUZZ_JOBS:-1}"
for tool in clang clang++; do
  command -v "$tool" >/dev/null || { echo "fuzz.sh: $tool is missing (Debian packages clang, libclang-rt-14-dev)" >&2; exit 2; }
done

sanitize="-fsanitize=address,fuzzer-no-link -fno-omit-frame-pointer"
CC=clang CXX=clang++ cmake -S "$root" -B "$build" -DSINKSCOPE_FUZZ=ON -DSINKSCOPE_CUDA=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_C_FLAGS=$sanitize" "-DCMAKE_CXX_FLAGS=$sanitize" >/dev/null
cmake --build "$build" -j "$jobs" --target experiment_fuzzer worker_message_fuzzer

run() {  # run TARGET SEED_DIR...
  local target="$1"; shift
  local corpus="$build/corpus/$target" artifacts="$build/artifacts/$target/"
  mkdir -p "$corpus" "$artifacts"
  echo "fuzz.sh: $target for ${seconds}s"
  # The first folder collects new inputs; the seed folders are only read.
  (cd "$build" && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 "$build/fuzz/$target" \
     -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
     -artifact_prefix="$artifacts" "$corpus" "$@")
}
run experiment_fuzzer "$root/fuzz/corpus/experiment" "$root/examples"
run worker_message_fuzzer "$root/fuzz/corpus/worker_message"
echo "fuzz.sh: no crash in ${seconds}s per target"
