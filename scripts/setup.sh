#!/usr/bin/env bash
# Installs every Debian package sinkscope needs to build, test and run its demo.
# Non-interactive and idempotent: safe to run again. Runs as root (no sudo).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export DEBIAN_FRONTEND=noninteractive

# One package list, read by this script and by the Dockerfiles.
mapfile -t packages < <(grep -v '^\s*#' "$here/packages.txt" | sed 's/#.*//' | xargs -n1)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${#missing[@]} package(s): ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "setup: all ${#packages[@]} packages present"
fi

# Node.js and npm for the tokenizer parity test (independent tokenizers from the npm
# registry) and scripts/fetch-tokenizers.sh; the machine's own Node.js is used if present.
if ! command -v npm >/dev/null 2>&1; then
  echo "setup: installing nodejs and npm"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
