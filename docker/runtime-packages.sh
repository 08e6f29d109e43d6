#!/usr/bin/env bash
# Prints, one per line, the Debian packages that own the shared libraries the given
# binaries load (as ldd resolves them on this machine). The images' build stage installs
# scripts/packages.txt and compiles; their runtime stage installs only what this prints,
# so the runtime packages follow from the one list instead of being a second one.
#
#   bash docker/runtime-packages.sh build/server/sinkscope-coordinator build/worker/sinkscope-worker
set -euo pipefail
(($#)) || { echo "usage: $0 BINARY..." >&2; exit 2; }

owner() {  # the package owning a file, trying the path as ldd gave it, then resolved
  local lib="$1" real candidate
  real="$(readlink -f "$lib")"
  # Merged /usr: dpkg may know a library as /lib/... or /usr/lib/... whichever way it
  # was found; alternatives (libopenblas.so.0 → openblas-openmp/) resolve to the owner.
  for candidate in "$real" "$lib" "${real#/usr}" "/usr${lib}"; do
    if dpkg-query -S "$candidate" 2>/dev/null | head -n1 | cut -d: -f1; then return 0; fi
  done
  # The CUDA libraries (cuBLAS, cuDNN, NCCL) of a toolkit installed outside dpkg: the CUDA
  # worker's runtime image (NVIDIA's cudnn-runtime) carries them itself.
  case "$real" in
    /usr/local/cuda*/lib*/libcublas*|/usr/local/cuda*/lib*/libcudnn*|/usr/local/cuda*/lib*/libnccl*)
      echo "runtime-packages: $lib comes with the CUDA runtime image" >&2
      return 0 ;;
  esac
  echo "runtime-packages: no package owns $lib" >&2
  return 1
}

libs="$(ldd "$@" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | sort -u)"
if ldd "$@" | grep -q 'not found'; then
  ldd "$@" >&2
  echo "runtime-packages: unresolved libraries" >&2
  exit 1
fi
for lib in $libs; do owner "$lib"; done | sort -u
