"""The PyTorch reference of scripts/bench/gpu.sh: the same model on the same GPU as
sinkscope-bench-gpu, trained the way PyTorch users train it.

Hugging Face LlamaForCausalLM built from the model JSON that `sinkscope-train
EXPERIMENT --print-model` prints (layers, d_model, heads, kv_heads, head_dim, ffn,
vocab, context, rope_theta, rms_eps, init_std, tied embeddings), SDPA attention, bf16
autocast over fp32 weights, fused AdamW (betas 0.9/0.95, weight decay 0.1), global-norm
clipping at 1, one micro-batch per step on uniform random tokens. --mode compile wraps the
model in torch.compile (its compilation is in the warm-up steps, not in the timing).
Baseline arm only: V-scale is not a Hugging Face module.

Prints one JSON object: {"model", "torch_mode", "torch", "tokens_per_second",
"ms_per_step", "mfu", "final_loss"}.
"""
import argparse
import json
import time

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--label", default="")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mode", choices=["eager", "compile"], default="eager")
    a = p.parse_args()
    m = json.load(open(a.model))
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=m["vocab"], hidden_size=m["d_model"], intermediate_size=m["ffn"],
        num_hidden_layers=m["layers"], num_attention_heads=m["heads"], num_key_value_heads=m["kv_heads"],
        head_dim=m["head_dim"], max_position_embeddings=m["context"], rope_theta=m["rope_theta"],
        rms_norm_eps=m["rms_eps"], initializer_range=m.get("init_std", 0.02),
        tie_word_embeddings=bool(m.get("tied_embeddings", False)), attention_bias=False, mlp_bias=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").cuda()
    decay = [q for q in model.parameters() if q.dim() == 2]
    rest = [q for q in model.parameters() if q.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), fused=True)
    fwd = torch.compile(model) if a.mode == "compile" else model
    B, T, V = a.micro_batch, m["context"], m["vocab"]
    g = torch.Generator(device="cuda").manual_seed(7)

    def step():
        x = torch.randint(0, V, (B, T), device="cuda", generator=g)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(input_ids=x, labels=x).loss  # Hugging Face shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    final = loss.item()  # waits for the last step
    wall = time.perf_counter() - t0
    tps = B * T * a.steps / wall
    # METRICS.md: 6·N_matmul + 6·L·H·dh·T per token, T tokens per sequence as sinkscope counts.
    n_matmul = m["layers"] * (m["d_model"] * (2 * m["heads"] + 2 * m["kv_heads"]) * m["head_dim"]
                              + 3 * m["d_model"] * m["ffn"]) + m["vocab"] * m["d_model"]
    flops = 6 * n_matmul + 6 * m["layers"] * m["heads"] * m["head_dim"] * T
    print(json.dumps({"model": a.label or a.model, "torch_mode": a.mode, "torch": torch.__version__,
                      "tokens_per_second": tps, "ms_per_step": 1e3 * wall / a.steps,
                      "mfu": flops * tps / 989.4e12, "final_loss": final}))


if __name__ == "__main__":
    main()
