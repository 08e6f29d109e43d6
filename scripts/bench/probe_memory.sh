#!/usr/bin/env bash
# What a diagnostic probe of a pretrained-size model costs on this machine: writes a
# random Llama-architecture Hugging Face folder of the chosen shape in bf16 (sharded as
# models ship, at most 2 GB per shard), probes it with sinkscope-probe on --seq tokens of
# text (--batch 1), and prints the peak resident memory and the time per 1,000 tokens.
# The weights are random: only the cost is measured, not the numbers.
#
#   bash scripts/bench/probe_memory.sh [--shape 1b|8b] [--seq T] [--keep DIR]
#   (1b: TinyLlama-1.1B's shape; 8b: Llama-3.1-8B's)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
shape=1b
seq=256
keep=""
while [ $# -gt 0 ]; do
  case "$1" in
    --shape) shape="$2"; shift 2 ;;
    --seq) seq="$2"; shift 2 ;;
    --keep) keep="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "probe_memory.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
bash "$root/scripts/build.sh" >/dev/null
work="${keep:-$(mktemp -d)}"
[ -n "$keep" ] || trap 'rm -rf "$work"' EXIT
mkdir -p "$work"
model="$work/model-$shape"
if [ ! -f "$model/model.safetensors.index.json" ]; then
  echo "writing a random $shape model in bf16 to $model ..." >&2
  /usr/bin/python3 - "$model" "$shape" <<'PY'
import json, os, struct, sys
import numpy as np
out, shape = sys.argv[1], sys.argv[2]
cfg = {"1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                  intermediate_size=5632, vocab_size=32000),
       "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=14336, vocab_size=128256)}[shape]
d, L, H, KV, F, V = (cfg[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                     "num_key_value_heads", "intermediate_size", "vocab_size"))
dh = d // H
os.makedirs(out, exist_ok=True)
config = dict(cfg, model_type="llama", head_dim=dh, max_position_embeddings=4096, rms_norm_eps=1e-5,
              rope_theta=500000.0, tie_word_embeddings=False, hidden_act="silu", torch_dtype="bfloat16")
json.dump(config, open(os.path.join(out, "config.json"), "w"), indent=1)
tensors = [("model.embed_tokens.weight", (V, d))]
for l in range(L):
    p = f"model.layers.{l}."
    tensors += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (H * dh, d)),
                (p + "self_attn.k_proj.weight", (KV * dh, d)), (p + "self_attn.v_proj.weight", (KV * dh, d)),
                (p + "self_attn.o_proj.weight", (d, H * dh)), (p + "post_attention_layernorm.weight", (d,)),
                (p + "mlp.gate_proj.weight", (F, d)), (p + "mlp.up_proj.weight", (F, d)),
                (p + "mlp.down_proj.weight", (d, F))]
tensors += [("model.norm.weight", (d,)), ("lm_head.weight", (V, d))]
rng = np.random.default_rng(0)
def bf16(shape):
    if len(shape) == 1:
        x = np.ones(shape, dtype=np.float32)
    else:
        x = rng.standard_normal(shape, dtype=np.float32) * 0.02
    return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # truncation is fine for random weights
shards, current, size = [], [], 0
for name, shp in tensors:
    n = int(np.prod(shp)) * 2
    if current and size + n > 2e9:
        shards.append(current); current, size = [], 0
    current.append((name, shp)); size += n
shards.append(current)
weight_map = {}
for i, group in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    header, offset = {}, 0
    for name, shp in group:
        n = int(np.prod(shp)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [offset, offset + n]}
        offset += n
        weight_map[name] = fname
    h = json.dumps(header).encode()
    h += b" " * ((8 - (8 + len(h)) % 8) % 8)
    with open(os.path.join(out, fname), "wb") as f:
        f.write(struct.pack("<Q", len(h))); f.write(h)
        for name, shp in group:
            f.write(bf16(shp))
json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(out, "model.safetensors.index.json"), "w"))
PY
fi
text="$work/text.txt"
cat /usr/share/games/fortunes/fortunes /usr/share/games/fortunes/literature /usr/share/games/fortunes/science \
  > "$text" 2>/dev/null || cat /usr/share/games/fortunes/* > "$text"
echo "probing $shape: 1 sequence of $seq tokens (bytes of text as token ids) ..." >&2
log="$work/probe.log"
# The pass's own lines (the memory estimate, the rate), then the peak resident memory of
# the process as the kernel counted it.
/usr/bin/python3 - "$root/build/tools/sinkscope-probe" "$model" "$text" "$seq" "$log" <<'PY'
import resource, subprocess, sys, time
tool, model, text, seq, log = sys.argv[1:]
start = time.time()
with open(log, "w") as err:
    r = subprocess.run([tool, model, "--text", text, "--batch", "1", "--seq", seq], stdout=subprocess.DEVNULL, stderr=err)
wall = time.time() - start
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1048576  # KiB → GiB
print(open(log).read().strip())
if r.returncode != 0:
    sys.exit(r.returncode)
print(f"peak resident memory {peak:.2f} GiB; {wall:.0f} s in all (loading included) for {seq} tokens")
PY
