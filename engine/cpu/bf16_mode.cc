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
// Two layers. Bf16Rounding computes on fp32 buffers and rounds each stored value with
// engine/bf16.h's RoundToBf16 (nearest, ties to even, as __float2bfloat16_rn): its buffers
// hold bf16-exact numbers in fp32 (Bf16Activations::kRoundedInF32). Bf16Storage, over it,
// is what a bf16 GPU backend looks like from the model: ActivationDType() is bf16, the
// model's activation views of the contract's bf16 list are 2-byte bf16, and each op widens
// the bf16 views it reads into fp32, runs Bf16Rounding's op, and narrows the bf16 views it
// writes — exactly, since Bf16Rounding has already rounded every value the contract
// stores in bf16. So the two compute the same numbers bit for bit, and a view the model
// stores in bf16 against the contract (a residual, r_attn, ...) would be rounded and show.
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

class Bf16Rounding final : public ForwardingBackend {
 public:
  explicit Bf16Rounding(std::unique_ptr<Backend> fp32) : ForwardingBackend(std::move(fp32)) {}
  const char* Name() const override { return "cpu-bf16-rounded"; }
  // The attention arms have no bf16 contract yet (docs/design/ARMS.md): fp32 CPU only.
  bool Supports(OptionalOp op) const override { return op != OptionalOp::kAttentionArms && inner().Supports(op); }

  // --- primitives: the fp32 backend's, with the bf16 roundings of the contract ---
  // bf16 operands, fp32 accumulation and output.
  void Gemm(bool ta, bool tb, int m, int n, int k, float alpha, TensorView a, TensorView b, float beta,
            TensorView c) override {
    const size_t na = static_cast<size_t>(m) * k, nb = static_cast<size_t>(k) * n;
    if (a_.size() < na) a_.resize(na);
    if (b_.size() < nb) b_.resize(nb);
    std::memcpy(a_.data(), a.f32("cpu-bf16-rounded Gemm"), na * sizeof(float));
    std::memcpy(b_.data(), b.f32("cpu-bf16-rounded Gemm"), nb * sizeof(float));
    Round(a_.data(), na);
    Round(b_.data(), nb);
    inner().Gemm(ta, tb, m, n, k, alpha, a_.data(), b_.data(), beta, c);
  }
  void RmsNormForward(TensorView o, float* r, TensorView x, const float* g, int N, int d, float e) override {
    inner().RmsNormForward(o, r, x, g, N, d, e);
    Round(o.f32("cpu-bf16-rounded RmsNormForward"), static_cast<size_t>(N) * d);
  }
  void RopeForward(TensorView x, int B, int T, int h, int dh, const RotaryFrequencies& r) override {
    inner().RopeForward(x, B, T, h, dh, r);
    Round(x.f32("cpu-bf16-rounded RopeForward"), static_cast<size_t>(B) * T * h * dh);
  }
  void AttentionForward(TensorView y, float* lse, float* ws, TensorView q, TensorView k, TensorView v, int B, int T,
                        int H, int KV, int dh) override {
    inner().AttentionForward(y, lse, ws, q, k, v, B, T, H, KV, dh);
    Round(y.f32("cpu-bf16-rounded AttentionForward"), static_cast<size_t>(B) * T * H * dh);
  }
  void VScaleForward(TensorView vh, TensorView v, const float* th, int N, int KV, int dh, double c,
                     VScaleMode mode) override {
    inner().VScaleForward(vh, v, th, N, KV, dh, c, mode);
    Round(vh.f32("cpu-bf16-rounded VScaleForward"), static_cast<size_t>(N) * KV * dh);
  }
  void SwiGluForward(TensorView h, TensorView g, TensorView u, int N, int F) override {
    inner().SwiGluForward(h, g, u, N, F);
    Round(h.f32("cpu-bf16-rounded SwiGluForward"), static_cast<size_t>(N) * F);
  }

  // --- fused ops whose intermediate products are stored in bf16 --------------------
  void AttentionInputForward(const AttentionShape& s, TensorView xn, const AttentionInputWeights& w,
                             const AttentionInputActs& a) override {
    const int N = s.N(), qd = s.H * s.dh, kvd = s.KV * s.dh;
    const bool qk_norm = w.q_norm != nullptr;
    float* q_proj = (qk_norm ? a.q_raw : a.q).f32("cpu-bf16-rounded AttentionInputForward");
    float* k_proj = (qk_norm ? a.k_raw : a.k).f32("cpu-bf16-rounded AttentionInputForward");
    float* v = a.v.f32("cpu-bf16-rounded AttentionInputForward");
    Gemm(false, true, N, qd, s.d, 1.0f, xn, w.wq, 0.0f, q_proj);
    Gemm(false, true, N, kvd, s.d, 1.0f, xn, w.wk, 0.0f, k_proj);
    Gemm(false, true, N, kvd, s.d, 1.0f, xn, w.wv, 0.0f, v);
    if (w.bq != nullptr) {  // the bias is added by the projection's epilogue, before the store
      AddRowBias(q_proj, w.bq, N, qd);
      AddRowBias(k_proj, w.bk, N, kvd);
      AddRowBias(v, w.bv, N, kvd);
    }
    Round(q_proj, static_cast<size_t>(N) * qd);
    Round(k_proj, static_cast<size_t>(N) * kvd);
    Round(v, static_cast<size_t>(N) * kvd);
    if (qk_norm) {
      inner().RmsNormForward(a.q, a.rstd_q, a.q_raw, w.q_norm, N * s.H, s.dh, s.eps);  // rounded after RoPE
      inner().RmsNormForward(a.k, a.rstd_k, a.k_raw, w.k_norm, N * s.KV, s.dh, s.eps);
    }
    RopeForward(a.q, s.B, s.T, s.H, s.dh, *s.rope);
    RopeForward(a.k, s.B, s.T, s.KV, s.dh, *s.rope);
    VScaleForward(a.vhat, a.v, w.theta, N, s.KV, s.dh, s.vscale_c_base, s.vscale);
  }
  void GateUpSwiGluForward(TensorView act, TensorView gate, TensorView up, TensorView x, const float* w_gate,
                           const float* w_up, int N, int F, int d) override {
    Gemm(false, true, N, F, d, 1.0f, x, w_gate, 0.0f, gate);
    Gemm(false, true, N, F, d, 1.0f, x, w_up, 0.0f, up);
    Round(gate.f32("cpu-bf16-rounded GateUpSwiGluForward"), static_cast<size_t>(N) * F);
    Round(up.f32("cpu-bf16-rounded GateUpSwiGluForward"), static_cast<size_t>(N) * F);
    SwiGluForward(act, gate, up, N, F);
  }

 private:
  std::vector<float> a_, b_;  // the GEMM's rounded operands
};

// fp32 host copies of the bf16 views one op touches: In widens a view the op reads, Out
// gives a buffer narrowed into the view when the op is done, InOut both. fp32 views (and
// absent ones) pass through untouched. The buffers come from the backend's pool, which
// keeps the largest size each slot has needed: no allocation per op once warm.
class Staging {
 public:
  explicit Staging(std::vector<std::vector<float>>& pool) : pool_(pool) {}
  Staging(const Staging&) = delete;
  Staging& operator=(const Staging&) = delete;
  ~Staging() {
    for (const WriteBack& w : write_back_) {
      auto* out = static_cast<uint16_t*>(w.view.data);
      const float* in = pool_[w.slot].data();
      const int64_t n = static_cast<int64_t>(w.n);
#pragma omp parallel for simd schedule(static)
      for (int64_t i = 0; i < n; ++i) out[i] = FloatToBf16Bits(in[i]);
    }
  }
  TensorView In(TensorView v, size_t n) { return Stage(v, n, true, false); }
  TensorView Out(TensorView v, size_t n) { return Stage(v, n, false, true); }
  TensorView InOut(TensorView v, size_t n) { return Stage(v, n, true, true); }

 private:
  TensorView Stage(TensorView v, size_t n, bool read, bool write) {
    if (!v || v.is_f32()) return v;
    if (v.dtype != DType::kBF16) v.f32("the cpu-bf16 backend");  // names the dtype and aborts
    const size_t slot = used_++;
    if (slot == pool_.size()) pool_.emplace_back();
    std::vector<float>& buffer = pool_[slot];  // its data stays put when the pool grows
    if (buffer.size() < n) buffer.resize(n);
    if (read) {
      const auto* in = static_cast<const uint16_t*>(v.data);
      float* out = buffer.data();
      const int64_t count = static_cast<int64_t>(n);
#pragma omp parallel for simd schedule(static)
      for (int64_t i = 0; i < count; ++i) out[i] = Bf16BitsToFloat(in[i]);
    }
    if (write) write_back_.push_back({v, slot, n});
    return buffer.data();
  }
  struct WriteBack {
    TensorView view;
    size_t slot, n;
  };
  std::vector<std::vector<float>>& pool_;
  size_t used_ = 0;
  std::vector<WriteBack> write_back_;
};

// Over the rounding layer, forwarding the ops with no view (AdamW, the norm backward
// with the residual, the gradient norm) as they are.
class Bf16Storage final : public FullForwardingBackend {
 public:
  explicit Bf16Storage(std::unique_ptr<Backend> rounding) : FullForwardingBackend(std::move(rounding)) {}
  const char* Name() const override { return "cpu-bf16"; }
  bool Supports(OptionalOp op) const override { return op != OptionalOp::kAttentionArms && inner().Supports(op); }
  DType ActivationDType() const override { return DType::kBF16; }

  // Every op with a view argument: bf16 views staged through fp32, the rounding layer's op.
  void AddRowBias(TensorView x, const float* b, int N, int n) override {
    Staging st(pool_);
    inner().AddRowBias(st.InOut(x, Count(N, n)), b, N, n);
  }
  void AccumulateTokenNormSum(float* acc, TensorView x, int B, int T, int G, int C, int P) override {
    Staging st(pool_);
    inner().AccumulateTokenNormSum(acc, st.In(x, Count(B, T, G, C)), B, T, G, C, P);
  }
  void Gemm(bool ta, bool tb, int m, int n, int k, float alpha, TensorView a, TensorView b, float beta,
            TensorView c) override {
    Staging st(pool_);
    const TensorView a32 = st.In(a, Count(m, k)), b32 = st.In(b, Count(k, n));
    inner().Gemm(ta, tb, m, n, k, alpha, a32, b32, beta, beta != 0 ? st.InOut(c, Count(m, n)) : st.Out(c, Count(m, n)));
  }
  void RmsNormForward(TensorView o, float* r, TensorView x, const float* g, int N, int d, float e) override {
    Staging st(pool_);
    const TensorView x32 = st.In(x, Count(N, d));
    inner().RmsNormForward(st.Out(o, Count(N, d)), r, x32, g, N, d, e);
  }
  void RmsNormBackward(float* dx, float* dg, const float* go, TensorView x, const float* g, const float* r, int N,
                       int d) override {
    Staging st(pool_);
    inner().RmsNormBackward(dx, dg, go, st.In(x, Count(N, d)), g, r, N, d);
  }
  void RopeForward(TensorView x, int B, int T, int h, int dh, const RotaryFrequencies& r) override {
    Staging st(pool_);
    inner().RopeForward(st.InOut(x, Count(B, T, h, dh)), B, T, h, dh, r);
  }
  void AttentionForward(TensorView y, float* lse, float* ws, TensorView q, TensorView k, TensorView v, int B, int T,
                        int H, int KV, int dh) override {
    Staging st(pool_);
    const TensorView q32 = st.In(q, Count(B, T, H, dh)), k32 = st.In(k, Count(B, T, KV, dh)),
                     v32 = st.In(v, Count(B, T, KV, dh));
    inner().AttentionForward(st.Out(y, Count(B, T, H, dh)), lse, ws, q32, k32, v32, B, T, H, KV, dh);
  }
  void AttentionBackward(float* dq, float* dk, float* dv, const float* dy, TensorView y, const float* lse,
                         const float* ws, TensorView q, TensorView k, TensorView v, int B, int T, int H, int KV,
                         int dh) override {
    Staging st(pool_);
    inner().AttentionBackward(dq, dk, dv, dy, st.In(y, Count(B, T, H, dh)), lse, ws, st.In(q, Count(B, T, H, dh)),
                              st.In(k, Count(B, T, KV, dh)), st.In(v, Count(B, T, KV, dh)), B, T, H, KV, dh);
  }
  void AttentionColumnStats(float* a, float* m, float* s2, float* r, TensorView q, TensorView k, const float* lse,
                            int B, int T, int H, int KV, int dh, const ColumnStatsRequest& req) override {
    Staging st(pool_);
    inner().AttentionColumnStats(a, m, s2, r, st.In(q, Count(B, T, H, dh)), st.In(k, Count(B, T, KV, dh)), lse, B, T, H,
                                 KV, dh, req);
  }
  void VScaleForward(TensorView vh, TensorView v, const float* th, int N, int KV, int dh, double c,
                     VScaleMode mode) override {
    Staging st(pool_);
    const TensorView v32 = st.In(v, Count(N, KV, dh));
    inner().VScaleForward(st.Out(vh, Count(N, KV, dh)), v32, th, N, KV, dh, c, mode);
  }
  void VScaleBackward(float* dv, float* dth, const float* dvh, TensorView v, const float* th, int N, int KV, int dh,
                      double c, VScaleMode mode) override {
    Staging st(pool_);
    inner().VScaleBackward(dv, dth, dvh, st.In(v, Count(N, KV, dh)), th, N, KV, dh, c, mode);
  }
  void SwiGluForward(TensorView h, TensorView g, TensorView u, int N, int F) override {
    Staging st(pool_);
    const TensorView g32 = st.In(g, Count(N, F)), u32 = st.In(u, Count(N, F));
    inner().SwiGluForward(st.Out(h, Count(N, F)), g32, u32, N, F);
  }
  void SwiGluBackward(float* dg, float* du, const float* dh, TensorView g, TensorView u, int N, int F) override {
    Staging st(pool_);
    inner().SwiGluBackward(dg, du, dh, st.In(g, Count(N, F)), st.In(u, Count(N, F)), N, F);
  }

  // The fused ops: staged whole, so the rounding layer runs its own fused op.
  void ResidualRmsNormForward(float* sum, TensorView out, float* rstd, const float* x, const float* r,
                              const float* gamma, int N, int d, float eps) override {
    Staging st(pool_);
    inner().ResidualRmsNormForward(sum, st.Out(out, Count(N, d)), rstd, x, r, gamma, N, d, eps);
  }

  void AttentionInputForward(const AttentionShape& s, TensorView xn, const AttentionInputWeights& w,
                             const AttentionInputActs& a) override {
    Staging st(pool_);
    const TensorView xn32 = st.In(xn, Count(s.N(), s.d));
    inner().AttentionInputForward(s, xn32, w, StageActs(st, s, a, /*written=*/true));
  }
  void AttentionInputBackward(const AttentionShape& s, float* dxn, float* dq, float* dk, const float* dv, TensorView xn,
                              const AttentionInputWeights& w, const AttentionInputActs& a, const AttentionInputGrads& g,
                              float* scratch_q, float* scratch_k) override {
    Staging st(pool_);
    inner().AttentionInputBackward(s, dxn, dq, dk, dv, st.In(xn, Count(s.N(), s.d)), w,
                                   StageActs(st, s, a, /*written=*/false), g, scratch_q, scratch_k);
  }
  void GateUpSwiGluForward(TensorView act, TensorView gate, TensorView up, TensorView x, const float* w_gate,
                           const float* w_up, int N, int F, int d) override {
    Staging st(pool_);
    const TensorView x32 = st.In(x, Count(N, d));
    inner().GateUpSwiGluForward(st.Out(act, Count(N, F)), st.Out(gate, Count(N, F)), st.Out(up, Count(N, F)), x32,
                                w_gate, w_up, N, F, d);
  }
  void GateUpSwiGluBackward(float* dx, float* dw_gate, float* dw_up, float* d_gate, float* d_up, const float* d_act,
                            TensorView gate, TensorView up, TensorView x, const float* w_gate, const float* w_up, int N,
                            int F, int d) override {
    Staging st(pool_);
    inner().GateUpSwiGluBackward(dx, dw_gate, dw_up, d_gate, d_up, d_act, st.In(gate, Count(N, F)),
                                 st.In(up, Count(N, F)), st.In(x, Count(N, d)), w_gate, w_up, N, F, d);
  }
  void LmHeadCrossEntropy(float* dx, float* dw, float* logits, int logits_rows, TensorView x, const float* w,
                          const int32_t* targets, int N, int V, int d, float grad_scale, double* loss_acc) override {
    Staging st(pool_);
    inner().LmHeadCrossEntropy(dx, dw, logits, logits_rows, st.In(x, Count(N, d)), w, targets, N, V, d, grad_scale,
                               loss_acc);
  }
  void LmHeadLoss(float* logits, int logits_rows, TensorView x, const float* w, const int32_t* targets, int N, int V,
                  int d, double* loss_acc) override {
    Staging st(pool_);
    inner().LmHeadLoss(logits, logits_rows, st.In(x, Count(N, d)), w, targets, N, V, d, loss_acc);
  }

 private:
  // The attention input's activations staged: written by the forward, read by the backward.
  static AttentionInputActs StageActs(Staging& st, const AttentionShape& s, const AttentionInputActs& a, bool written) {
    const size_t qd = Count(s.N(), s.H, s.dh), kvd = Count(s.N(), s.KV, s.dh);
    auto stage = [&](TensorView v, size_t n) { return written ? st.Out(v, n) : st.In(v, n); };
    AttentionInputActs staged = a;  // rstd_q and rstd_k are fp32
    staged.q = stage(a.q, qd);
    staged.k = stage(a.k, kvd);
    staged.v = stage(a.v, kvd);
    staged.vhat = stage(a.vhat, kvd);
    staged.q_raw = stage(a.q_raw, qd);
    staged.k_raw = stage(a.k_raw, kvd);
    return staged;
  }
  template <typename... Dims>
  static size_t Count(Dims... dims) {
    return (size_t{1} * ... * static_cast<size_t>(dims));
  }
  std::vector<std::vector<float>> pool_;  // Staging's buffers
};

}  // namespace

std::unique_ptr<Backend> MakeCpuBf16Backend(Bf16Activations activations) {
  auto rounding = std::make_unique<Bf16Rounding>(MakeCpuBackend());
  if (activations == Bf16Activations::kRoundedInF32) return rounding;
  return std::make_unique<Bf16Storage>(std::move(rounding));
}

}  // namespace sinkscope
