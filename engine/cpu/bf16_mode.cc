// The CPU backend's bf16 mode: the fp32 CPU backend with every value a bf16 GPU backend
// stores in bf16 rounded to bf16 where that backend would round it, so GPU-vs-CPU
// comparisons in bf16 can be tight. The contract (engine/backend.h, MakeCpuBackend):
//
//   bf16: the operands of every matmul (a bf16 copy of the fp32 weights; activations and
//         activation gradients as the GEMM reads them), and the activations x̃ and x̃_mlp
//         (norm outputs), the q, k, v projections, q and k after the q/k norms and RoPE,
//         v̂, the attention output y, gate, up and SwiGLU's output, the final norm's output.
//   fp32: matmul accumulation and outputs that are not in the list (r_attn, r_mlp, the
//         residual stream, the logits and cross-entropy, every weight gradient), norms'
//         rstd, the log-sum-exp, master weights and AdamW state, every scalar.
//
// Values live in fp32 buffers holding bf16-exact numbers (the top 16 bits), rounded with
// engine/bf16.h's RoundToBf16 (nearest, ties to even, as __float2bfloat16_rn).
#include <cstring>
#include <vector>

#include "engine/backend.h"
#include "engine/bf16.h"
#include "engine/forwarding_backend.h"

namespace sinkscope {
namespace {

void Round(float* x, size_t n) {
#pragma omp parallel for simd schedule(static)
  for (size_t i = 0; i < n; ++i) x[i] = RoundToBf16(x[i]);
}

class Bf16Mode final : public ForwardingBackend {
 public:
  explicit Bf16Mode(std::unique_ptr<Backend> fp32) : ForwardingBackend(std::move(fp32)) {}
  const char* Name() const override { return "cpu-bf16"; }

  // --- primitives: the fp32 backend's, with the bf16 roundings of the contract ---
  // bf16 operands, fp32 accumulation and output.
  void Gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, const float* b, float beta,
            float* c) override {
    const size_t na = static_cast<size_t>(m) * k, nb = static_cast<size_t>(k) * n;
    if (a_.size() < na) a_.resize(na);
    if (b_.size() < nb) b_.resize(nb);
    std::memcpy(a_.data(), a, na * sizeof(float));
    std::memcpy(b_.data(), b, nb * sizeof(float));
    Round(a_.data(), na);
    Round(b_.data(), nb);
    inner().Gemm(ta, tb, m, n, k, alpha, a_.data(), b_.data(), beta, c);
  }
  void RmsNormForward(float* o, float* r, const float* x, const float* g, int N, int d, float e) override {
    inner().RmsNormForward(o, r, x, g, N, d, e);
    Round(o, static_cast<size_t>(N) * d);
  }
  void RopeForward(float* x, int B, int T, int h, int dh, const RotaryFrequencies& r) override {
    inner().RopeForward(x, B, T, h, dh, r);
    Round(x, static_cast<size_t>(B) * T * h * dh);
  }
  void AttentionForward(float* y, float* lse, float* ws, const float* q, const float* k, const float* v, int B, int T,
                        int H, int KV, int dh) override {
    inner().AttentionForward(y, lse, ws, q, k, v, B, T, H, KV, dh);
    Round(y, static_cast<size_t>(B) * T * H * dh);
  }
  void VScaleForward(float* vh, const float* v, const float* th, int N, int KV, int dh, double c,
                     VScaleMode mode) override {
    inner().VScaleForward(vh, v, th, N, KV, dh, c, mode);
    Round(vh, static_cast<size_t>(N) * KV * dh);
  }
  void SwiGluForward(float* h, const float* g, const float* u, int N, int F) override {
    inner().SwiGluForward(h, g, u, N, F);
    Round(h, static_cast<size_t>(N) * F);
  }

  // --- fused ops whose intermediate products are stored in bf16 --------------------
  void AttentionInputForward(const AttentionShape& s, const float* xn, const AttentionInputWeights& w,
                             const AttentionInputActs& a) override {
    const int N = s.N(), qd = s.H * s.dh, kvd = s.KV * s.dh;
    const bool qk_norm = w.q_norm != nullptr;
    float* q_proj = qk_norm ? a.q_raw : a.q;
    float* k_proj = qk_norm ? a.k_raw : a.k;
    Gemm(false, true, N, qd, s.d, 1.0f, xn, w.wq, 0.0f, q_proj);
    Gemm(false, true, N, kvd, s.d, 1.0f, xn, w.wk, 0.0f, k_proj);
    Gemm(false, true, N, kvd, s.d, 1.0f, xn, w.wv, 0.0f, a.v);
    if (w.bq != nullptr) {  // the bias is added by the projection's epilogue, before the store
      AddRowBias(q_proj, w.bq, N, qd);
      AddRowBias(k_proj, w.bk, N, kvd);
      AddRowBias(a.v, w.bv, N, kvd);
    }
    Round(q_proj, static_cast<size_t>(N) * qd);
    Round(k_proj, static_cast<size_t>(N) * kvd);
    Round(a.v, static_cast<size_t>(N) * kvd);
    if (qk_norm) {
      inner().RmsNormForward(a.q, a.rstd_q, a.q_raw, w.q_norm, N * s.H, s.dh, s.eps);  // rounded after RoPE
      inner().RmsNormForward(a.k, a.rstd_k, a.k_raw, w.k_norm, N * s.KV, s.dh, s.eps);
    }
    RopeForward(a.q, s.B, s.T, s.H, s.dh, *s.rope);
    RopeForward(a.k, s.B, s.T, s.KV, s.dh, *s.rope);
    VScaleForward(a.vhat, a.v, w.theta, N, s.KV, s.dh, s.vscale_c_base, s.vscale);
  }
  void GateUpSwiGluForward(float* act, float* gate, float* up, const float* x, const float* w_gate,
                           const float* w_up, int N, int F, int d) override {
    Gemm(false, true, N, F, d, 1.0f, x, w_gate, 0.0f, gate);
    Gemm(false, true, N, F, d, 1.0f, x, w_up, 0.0f, up);
    Round(gate, static_cast<size_t>(N) * F);
    Round(up, static_cast<size_t>(N) * F);
    SwiGluForward(act, gate, up, N, F);
  }

 private:
  std::vector<float> a_, b_;  // the GEMM's rounded operands
};

}  // namespace

std::unique_ptr<Backend> MakeCpuBf16Backend() { return std::make_unique<Bf16Mode>(MakeCpuBackend()); }

}  // namespace sinkscope
