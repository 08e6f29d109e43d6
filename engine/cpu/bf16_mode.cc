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

namespace sinkscope {
namespace {

void Round(float* x, size_t n) {
#pragma omp parallel for simd schedule(static)
  for (size_t i = 0; i < n; ++i) x[i] = RoundToBf16(x[i]);
}

class Bf16Mode final : public Backend {
 public:
  explicit Bf16Mode(std::unique_ptr<Backend> fp32) : in_(std::move(fp32)) {}
  const char* Name() const override { return "cpu-bf16"; }
  bool Supports(OptionalOp op) const override { return in_->Supports(op); }

  // --- primitives: the fp32 backend's, with the bf16 roundings of the contract ---
  float* Alloc(size_t n) override { return in_->Alloc(n); }
  int32_t* AllocInt(size_t n) override { return in_->AllocInt(n); }
  void Free(void* p) override { in_->Free(p); }
  void ToDevice(void* d, const void* s, size_t b) override { in_->ToDevice(d, s, b); }
  void ToHost(void* d, const void* s, size_t b) override { in_->ToHost(d, s, b); }
  void Copy(float* d, const float* s, size_t n) override { in_->Copy(d, s, n); }
  void Fill(float* x, float v, size_t n) override { in_->Fill(x, v, n); }
  double* AllocScalars(size_t n) override { return in_->AllocScalars(n); }
  void ZeroScalars(double* s, size_t n) override { in_->ZeroScalars(s, n); }
  void ReadScalars(double* h, const double* s, size_t n) override { in_->ReadScalars(h, s, n); }
  void Axpy(float* y, float a, const float* x, size_t n) override { in_->Axpy(y, a, x, n); }
  void Scale(float* x, float s, size_t n) override { in_->Scale(x, s, n); }
  void AddRowBias(float* x, const float* b, int N, int n) override { in_->AddRowBias(x, b, N, n); }
  void AccumulateColumnSums(float* a, const float* x, int N, int n) override { in_->AccumulateColumnSums(a, x, N, n); }
  void AccumulateSumSquares(double* a, const float* x, size_t n) override { in_->AccumulateSumSquares(a, x, n); }
  void AccumulateTokenSum(float* a, const float* x, int B, int T, int C, int P) override {
    in_->AccumulateTokenSum(a, x, B, T, C, P);
  }
  void AccumulateTokenNormSum(float* a, const float* x, int B, int T, int G, int C, int P) override {
    in_->AccumulateTokenNormSum(a, x, B, T, G, C, P);
  }
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
    in_->Gemm(ta, tb, m, n, k, alpha, a_.data(), b_.data(), beta, c);
  }
  void EmbeddingForward(float* o, const int32_t* t, const float* tab, int N, int d) override {
    in_->EmbeddingForward(o, t, tab, N, d);  // the residual stream: fp32
  }
  void EmbeddingBackward(float* dt, const float* g, const int32_t* t, int N, int d) override {
    in_->EmbeddingBackward(dt, g, t, N, d);
  }
  void RmsNormForward(float* o, float* r, const float* x, const float* g, int N, int d, float e) override {
    in_->RmsNormForward(o, r, x, g, N, d, e);
    Round(o, static_cast<size_t>(N) * d);
  }
  void RmsNormBackward(float* dx, float* dg, const float* go, const float* x, const float* g, const float* r, int N,
                       int d) override {
    in_->RmsNormBackward(dx, dg, go, x, g, r, N, d);
  }
  void RopeForward(float* x, int B, int T, int h, int dh, const RotaryFrequencies& r) override {
    in_->RopeForward(x, B, T, h, dh, r);
    Round(x, static_cast<size_t>(B) * T * h * dh);
  }
  void RopeBackward(float* x, int B, int T, int h, int dh, const RotaryFrequencies& r) override {
    in_->RopeBackward(x, B, T, h, dh, r);
  }
  size_t AttentionWorkspaceFloats(int B, int T, int H) const override { return in_->AttentionWorkspaceFloats(B, T, H); }
  void AttentionForward(float* y, float* lse, float* ws, const float* q, const float* k, const float* v, int B, int T,
                        int H, int KV, int dh) override {
    in_->AttentionForward(y, lse, ws, q, k, v, B, T, H, KV, dh);
    Round(y, static_cast<size_t>(B) * T * H * dh);
  }
  void AttentionBackward(float* dq, float* dk, float* dv, const float* dy, const float* y, const float* lse,
                         const float* ws, const float* q, const float* k, const float* v, int B, int T, int H, int KV,
                         int dh) override {
    in_->AttentionBackward(dq, dk, dv, dy, y, lse, ws, q, k, v, B, T, H, KV, dh);
  }
  void AttentionColumnStats(float* a, float* m, float* s2, float* r, const float* q, const float* k, const float* lse,
                            int B, int T, int H, int KV, int dh, const ColumnStatsRequest& req) override {
    in_->AttentionColumnStats(a, m, s2, r, q, k, lse, B, T, H, KV, dh, req);
  }
  void VScaleForward(float* vh, const float* v, const float* th, int N, int KV, int dh, double c,
                     VScaleMode mode) override {
    in_->VScaleForward(vh, v, th, N, KV, dh, c, mode);
    Round(vh, static_cast<size_t>(N) * KV * dh);
  }
  void VScaleBackward(float* dv, float* dth, const float* dvh, const float* v, const float* th, int N, int KV, int dh,
                      double c, VScaleMode mode) override {
    in_->VScaleBackward(dv, dth, dvh, v, th, N, KV, dh, c, mode);
  }
  void SwiGluForward(float* h, const float* g, const float* u, int N, int F) override {
    in_->SwiGluForward(h, g, u, N, F);
    Round(h, static_cast<size_t>(N) * F);
  }
  void SwiGluBackward(float* dg, float* du, const float* dh, const float* g, const float* u, int N, int F) override {
    in_->SwiGluBackward(dg, du, dh, g, u, N, F);
  }
  void CrossEntropyForwardBackward(float* l, const int32_t* t, int N, int V, float s, double* acc) override {
    in_->CrossEntropyForwardBackward(l, t, N, V, s, acc);
  }
  void CrossEntropyLoss(const float* l, const int32_t* t, int N, int V, double* acc) override {
    in_->CrossEntropyLoss(l, t, N, V, acc);
  }
  void AdamW(float* p, const float* g, float* m, float* v, size_t n, float lr, float b1, float b2, float eps, float wd,
             float gs, int64_t step) override {
    in_->AdamW(p, g, m, v, n, lr, b1, b2, eps, wd, gs, step);
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
      in_->RmsNormForward(a.q, a.rstd_q, a.q_raw, w.q_norm, N * s.H, s.dh, s.eps);  // rounded after RoPE
      in_->RmsNormForward(a.k, a.rstd_k, a.k_raw, w.k_norm, N * s.KV, s.dh, s.eps);
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
  std::unique_ptr<Backend> in_;
  std::vector<float> a_, b_;  // the GEMM's rounded operands
};

}  // namespace

std::unique_ptr<Backend> MakeCpuBf16Backend() { return std::make_unique<Bf16Mode>(MakeCpuBackend()); }

}  // namespace sinkscope
