"""The quickstart model trained by PyTorch on the CPU: the reference sinkscope-bench-cpu's
tokens/s are compared with (scripts/bench/cpu.sh runs both in the same run).

The same model as sinkscope's engine: Llama-style decoder, 4 layers, d_model 128, 4 query
heads over 2 KV heads (GQA), head_dim 32, SwiGLU ffn 352, vocab 257, context 128, RMSNorm
(eps 1e-5), half-split RoPE (base 10000), untied LM head; the V-scale arm scales each
value vector by r/(r + C·e^θ), r = ‖v‖², C = d_model·d_head·σ², θ per layer and KV head.
AdamW (betas 0.9/0.95, weight decay 0.1 on 2-D weights), global-norm clipping at 1, one
micro-batch of 16 sequences per step, uniform random byte tokens. Attention is written
out (PyTorch 1.13 has no fused scaled_dot_product_attention on the CPU); it is what
PyTorch users ran on 1.13.

Prints one JSON object: {"arms": [{"arm", "tokens_per_second", "ms_per_step", "final_loss"}],
"torch", "threads"}.
"""
import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

L, D, H, KV, DH, FFN, V, T, B = 4, 128, 4, 2, 32, 352, 257, 128, 16
SIGMA = 0.02


class RMSNorm(torch.nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(t, dh, base=10000.0):
    inv = 1.0 / (base ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh))
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cos(ang).float(), torch.sin(ang).float()


def rope(x, cos, sin):  # x (B, T, heads, dh), half-split pairs (j, j + dh/2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class Block(torch.nn.Module):
    def __init__(self, vscale):
        super().__init__()
        self.input_layernorm = RMSNorm(D)
        self.q = torch.nn.Linear(D, H * DH, bias=False)
        self.k = torch.nn.Linear(D, KV * DH, bias=False)
        self.v = torch.nn.Linear(D, KV * DH, bias=False)
        self.o = torch.nn.Linear(H * DH, D, bias=False)
        self.post_attention_layernorm = RMSNorm(D)
        self.gate = torch.nn.Linear(D, FFN, bias=False)
        self.up = torch.nn.Linear(D, FFN, bias=False)
        self.down = torch.nn.Linear(FFN, D, bias=False)
        self.vscale = vscale
        self.theta = torch.nn.Parameter(torch.zeros(KV), requires_grad=vscale)

    def forward(self, h, cos, sin, mask):
        x = self.input_layernorm(h)
        q = rope(self.q(x).view(B, T, H, DH), cos, sin)
        k = rope(self.k(x).view(B, T, KV, DH), cos, sin)
        v = self.v(x).view(B, T, KV, DH)
        if self.vscale:
            r = v.pow(2).sum(-1, keepdim=True)
            c = D * DH * SIGMA * SIGMA * torch.exp(self.theta)[None, None, :, None]
            v = r / (r + c) * v
        rep = H // KV
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, dh)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(DH)
        a = torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1)
        y = (a @ v).transpose(1, 2).reshape(B, T, H * DH)
        h = h + self.o(y)
        x = self.post_attention_layernorm(h)
        return h + self.down(F.silu(self.gate(x)) * self.up(x))


class Model(torch.nn.Module):
    def __init__(self, vscale):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        self.blocks = torch.nn.ModuleList(Block(vscale) for _ in range(L))
        self.norm = RMSNorm(D)
        self.head = torch.nn.Linear(D, V, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=SIGMA)
        cos, sin = rope_tables(T, DH)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        self.register_buffer("mask", torch.triu(torch.ones(T, T, dtype=torch.bool), 1))

    def forward(self, tokens):
        h = self.embed(tokens)
        for b in self.blocks:
            h = b(h, self.cos, self.sin, self.mask)
        return self.head(self.norm(h))


def run(arm, steps, warmup, seed):
    torch.manual_seed(seed)
    model = Model(vscale=arm == "vscale")
    decay = [p for p in model.parameters() if p.dim() == 2]
    other = [p for p in model.parameters() if p.dim() != 2 and p.requires_grad]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(seed)
    loss = None
    times = []
    for i in range(warmup + steps):
        tokens = torch.randint(0, V, (B, T + 1), generator=gen)
        start = time.perf_counter()
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    seconds = sum(times)
    return {"arm": arm, "tokens_per_second": steps * B * T / seconds, "ms_per_step": 1e3 * seconds / steps,
            "final_loss": float(loss)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    arms = [run(arm, a.steps, a.warmup, seed=0) for arm in ("baseline", "vscale")]
    print(json.dumps({"arms": arms, "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
