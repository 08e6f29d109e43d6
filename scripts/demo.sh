#!/usr/bin/env bash
# The main job: installs dependencies, builds, and trains examples/quickstart.yaml,
# baseline against V-scale, printing the comparison.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
bash "$root/scripts/build.sh"
cd "$root"
exec "$root/build/worker/sinkscope-train" examples/quickstart.yaml --out runs/quickstart "$@"
