#!/usr/bin/env bash
# Here, on a machine without a GPU: builds the GPU checks and the GPU benchmark and puts
# them, with every shared library they need that the GPU machine lacks, into build-gpu/
# (ignored by git). The device tool carries that folder with the working tree; there,
# `bash scripts/gpu/run.sh` runs everything. See scripts/gpu/README.md.
#
#   bash scripts/gpu/bundle.sh            # then: run with carry ["build-gpu"]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
out=build-gpu
bins=(cuda_parity_test cuda_step_test cuda_bf16_step_test cudnn_graph_test nccl_test sinkscope-bench-gpu)

bash scripts/build.sh -DSINKSCOPE_CUDA=ON >/dev/null
rm -rf "$out"
mkdir -p "$out/bin" "$out/lib" "$out/models"
for b in "${bins[@]}"; do
  path="$(find build -type f -name "$b" -perm -u+x | head -1)"
  test -n "$path" || { echo "bundle: $b was not built" >&2; exit 1; }
  strip --strip-debug -o "$out/bin/$b" "$path"
done

# Libraries: everything ldd resolves except the C runtime (newer on the GPU machine's
# image), the driver, and the CUDA libraries that machine has as Python wheels.
skip='^(linux-vdso|ld-linux|libc\.so|libm\.so|libpthread|libdl\.so|librt\.so|libgcc_s|libstdc\+\+|libcuda\.so|libcublas|libcublasLt|libcudnn|libnccl|libcudart)'
for b in "$out"/bin/*; do
  ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}'
done | sort -u | while read -r name path; do
  if [[ ! "$name" =~ $skip ]]; then cp -L "$path" "$out/lib/$name"; fi
done

# The models the benchmark trains, as the schema reads them from examples/.
for m in quickstart paper-0.1b paper-0.3b; do
  build/tools/sinkscope-train "examples/$m.yaml" --print-model > "$out/models/$m.json"
done
git rev-parse HEAD > "$out/commit" 2>/dev/null || true

# The dry run's roofline estimates (scripts/bench/README.md, "The dry run"), made here on
# the CUDA emulation, for gpu.sh to print beside what the GPU measures: both arms it
# trains, at its default micro-batch (8) and the paper's (16).
dry=build/scripts/bench/sinkscope-gpu-dry-run
if [[ -x "$dry" ]]; then
  : > "$out/dry-run.jsonl"
  for m in paper-0.1b paper-0.3b; do
    for arm in baseline vscale; do
      for B in 8 16; do
        "$dry" --model "$out/models/$m.json" --label "$m" --arm "$arm" --micro-batch "$B" --json >> "$out/dry-run.jsonl" ||
          echo "bundle: the dry run of $m ($arm, B $B) failed; gpu.sh prints no estimate for it" >&2
      done
    done
  done
fi

size_kib="$(du -sk "$out" | cut -f1)"
echo "bundle: $out: ${#bins[@]} binaries, $(ls "$out/lib" | wc -l) libraries, $((size_kib / 1024)) MiB"
if (( size_kib > 60 * 1024 )); then
  echo "bundle: $out is over the 60 MiB the device tool carries with the tree" >&2
  exit 1
fi
