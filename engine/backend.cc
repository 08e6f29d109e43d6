// The default implementations of the block-level fused ops: each is the composition of
// primitive ops the model used to call one by one, in the same order, so a backend that
// overrides none of them computes bit for bit what the unfused model did.
#include "engine/backend.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace sinkscope {

void Backend::ResidualRmsNormForward(float* sum, TensorView out, float* rstd, const float* x, const float* r,
                                     const float* gamma, int N, int d, float eps) {
  const size_t n = static_cast<size_t>(N) * d;
  if (sum != x) Copy(sum, x, n);
  Axpy(sum, 1.0f, r, n);
  RmsNormForward(out, rstd, sum, gamma, N, d, eps);
}

void Backend::RmsNormBackwardResidual(float* dx, float* dgamma, const float* d_residual, const float* dout,
                                      const float* x, const float* gamma, const float* rstd, int N, int d) {
  if (dx != d_residual) Copy(dx, d_residual, static_cast<size_t>(N) * d);
  RmsNormBackward(dx, dgamma, dout, x, gamma, rstd, N, d);
}

void Backend::AttentionInputForward(const AttentionShape& s, TensorView xn, const AttentionInputWeights& w,
                                    const AttentionInputActs& a) {
  const int N = s.N(), qd = s.H * s.dh, kvd = s.KV * s.dh;
  const bool qk_norm = w.q_norm != nullptr;
  const TensorView q_proj = qk_norm ? a.q_raw : a.q;
  const TensorView k_proj = qk_norm ? a.k_raw : a.k;
  Gemm(false, true, N, qd, s.d, 1.0f, xn, w.wq, 0.0f, q_proj);   // (N,H·dh)
  Gemm(false, true, N, kvd, s.d, 1.0f, xn, w.wk, 0.0f, k_proj);  // (N,KV·dh)
  Gemm(false, true, N, kvd, s.d, 1.0f, xn, w.wv, 0.0f, a.v);     // (N,KV·dh)
  if (w.bq != nullptr) {
    AddRowBias(q_proj, w.bq, N, qd);
    AddRowBias(k_proj, w.bk, N, kvd);
    AddRowBias(a.v, w.bv, N, kvd);
  }
  if (qk_norm) {  // each head's q and k normalised over dh, before RoPE (rows = N·heads)
    RmsNormForward(a.q, a.rstd_q, a.q_raw, w.q_norm, N * s.H, s.dh, s.eps);
    RmsNormForward(a.k, a.rstd_k, a.k_raw, w.k_norm, N * s.KV, s.dh, s.eps);
  }
  RopeForward(a.q, s.B, s.T, s.H, s.dh, *s.rope);
  RopeForward(a.k, s.B, s.T, s.KV, s.dh, *s.rope);
  VScaleForward(a.vhat, a.v, w.theta, N, s.KV, s.dh, s.vscale_c_base, s.vscale);
}

void Backend::AttentionInputBackward(const AttentionShape& s, float* dxn, float* dq, float* dk, const float* dv,
                                     TensorView xn, const AttentionInputWeights& w, const AttentionInputActs& a,
                                     const AttentionInputGrads& g, float* scratch_q, float* scratch_k) {
  const int N = s.N(), qd = s.H * s.dh, kvd = s.KV * s.dh;
  RopeBackward(dq, s.B, s.T, s.H, s.dh, *s.rope);
  RopeBackward(dk, s.B, s.T, s.KV, s.dh, *s.rope);
  float* dq_proj = dq;  // ∂L/∂(W_q x̃ + b_q)
  float* dk_proj = dk;
  if (w.q_norm != nullptr) {
    Fill(scratch_q, 0.0f, static_cast<size_t>(N) * qd);  // RmsNormBackward accumulates
    Fill(scratch_k, 0.0f, static_cast<size_t>(N) * kvd);
    RmsNormBackward(scratch_q, g.q_norm, dq, a.q_raw, w.q_norm, a.rstd_q, N * s.H, s.dh);
    RmsNormBackward(scratch_k, g.k_norm, dk, a.k_raw, w.k_norm, a.rstd_k, N * s.KV, s.dh);
    dq_proj = scratch_q;
    dk_proj = scratch_k;
  }
  if (g.bq != nullptr) {
    AccumulateColumnSums(g.bq, dq_proj, N, qd);
    AccumulateColumnSums(g.bk, dk_proj, N, kvd);
    AccumulateColumnSums(g.bv, dv, N, kvd);
  }
  AttentionInputBackwardGemms(s, dxn, dq_proj, dk_proj, dv, xn, w, g);
}

void Backend::AttentionInputBackwardGemms(const AttentionShape& s, float* dxn, TensorView dq_proj, TensorView dk_proj,
                                          TensorView dv, TensorView xn, const AttentionInputWeights& w,
                                          const AttentionInputGrads& g) {
  const int N = s.N(), qd = s.H * s.dh, kvd = s.KV * s.dh;
  Gemm(false, false, N, s.d, qd, 1.0f, dq_proj, w.wq, 0.0f, dxn);  // ∂L/∂x̃ (N,d)
  Gemm(false, false, N, s.d, kvd, 1.0f, dk_proj, w.wk, 1.0f, dxn);
  Gemm(false, false, N, s.d, kvd, 1.0f, dv, w.wv, 1.0f, dxn);
  if (g.wq != nullptr) {
    Gemm(true, false, qd, s.d, N, 1.0f, dq_proj, xn, 1.0f, g.wq);
    Gemm(true, false, kvd, s.d, N, 1.0f, dk_proj, xn, 1.0f, g.wk);
    Gemm(true, false, kvd, s.d, N, 1.0f, dv, xn, 1.0f, g.wv);
  }
}

void Backend::GateUpSwiGluForward(TensorView act, TensorView gate, TensorView up, TensorView x, const float* w_gate,
                                  const float* w_up, int N, int F, int d) {
  Gemm(false, true, N, F, d, 1.0f, x, w_gate, 0.0f, gate);  // (N,F)
  Gemm(false, true, N, F, d, 1.0f, x, w_up, 0.0f, up);      // (N,F)
  SwiGluForward(act, gate, up, N, F);
}

void Backend::GateUpSwiGluBackward(float* dx, float* dw_gate, float* dw_up, float* d_gate, float* d_up,
                                   const float* d_act, TensorView gate, TensorView up, TensorView x,
                                   const float* w_gate, const float* w_up, int N, int F, int d) {
  SwiGluBackward(d_gate, d_up, d_act, gate, up, N, F);
  GateUpBackwardGemms(dx, dw_gate, dw_up, d_gate, d_up, x, w_gate, w_up, N, F, d);
}

void Backend::GateUpBackwardGemms(float* dx, float* dw_gate, float* dw_up, TensorView d_gate, TensorView d_up,
                                  TensorView x, const float* w_gate, const float* w_up, int N, int F, int d) {
  Gemm(false, false, N, d, F, 1.0f, d_gate, w_gate, 0.0f, dx);
  Gemm(false, false, N, d, F, 1.0f, d_up, w_up, 1.0f, dx);
  if (dw_gate != nullptr) {
    Gemm(true, false, F, d, N, 1.0f, d_gate, x, 1.0f, dw_gate);
    Gemm(true, false, F, d, N, 1.0f, d_up, x, 1.0f, dw_up);
  }
}

void Backend::LmHeadCrossEntropy(float* dx, float* dw, float* logits, int logits_rows, TensorView x,
                                 const float* w, const int32_t* targets, int N, int V, int d, float grad_scale,
                                 double* loss_acc) {
  // In chunks of logits_rows rows (one chunk when the buffer holds all N).
  for (int r0 = 0; r0 < N; r0 += logits_rows) {
    const int R = std::min(logits_rows, N - r0);
    const TensorView xr = x.From(static_cast<size_t>(r0) * d);
    Gemm(false, true, R, V, d, 1.0f, xr, w, 0.0f, logits);  // (R,V)
    CrossEntropyForwardBackward(logits, targets + r0, R, V, grad_scale, loss_acc);
    Gemm(false, false, R, d, V, 1.0f, logits, w, 0.0f, dx + static_cast<size_t>(r0) * d);  // dx (R,d)
    if (dw != nullptr) Gemm(true, false, V, d, R, 1.0f, logits, xr, 1.0f, dw);           // dW += dlogitsᵀ x
  }
}

void Backend::LmHeadLoss(float* logits, int logits_rows, TensorView x, const float* w, const int32_t* targets,
                         int N, int V, int d, double* loss_acc) {
  for (int r0 = 0; r0 < N; r0 += logits_rows) {
    const int R = std::min(logits_rows, N - r0);
    Gemm(false, true, R, V, d, 1.0f, x.From(static_cast<size_t>(r0) * d), w, 0.0f, logits);
    CrossEntropyLoss(logits, targets + r0, R, V, loss_acc);
  }
}

void Backend::MultiTensorAdamW(const std::vector<AdamWTensor>& tensors, const AdamWHyper& h, const double* guard) {
  double host[2];
  ReadScalars(host, guard, 2);  // the composed path reads the guard; a fused kernel reads it on the device
  const double norm = std::sqrt(host[1]);
  if (!std::isfinite(host[0]) || !std::isfinite(norm)) return;
  const float clip_scale = (h.grad_clip > 0 && norm > h.grad_clip) ? static_cast<float>(h.grad_clip / norm) : 1.0f;
  for (const AdamWTensor& t : tensors) {
    AdamW(t.p, t.g, t.m, t.v, t.n, h.lr, h.beta1, h.beta2, h.eps, t.weight_decay, clip_scale, h.step);
  }
}

bool InsertTop3(double* top3, double v) {
  if (v > top3[0]) {
    top3[2] = top3[1];
    top3[1] = top3[0];
    top3[0] = v;
    return true;
  }
  if (v > top3[1]) {
    top3[2] = top3[1];
    top3[1] = v;
  } else if (v > top3[2]) {
    top3[2] = v;
  }
  return false;
}

void HostAbsTop3(float* x, size_t n, double top[4]) {
  top[0] = top[1] = top[2] = top[3] = -1;
  for (size_t i = 0; i < n; ++i) {
    x[i] = std::fabs(x[i]);
    if (InsertTop3(top, x[i])) top[3] = static_cast<double>(i);  // the first of equal largest
  }
}

void HostRadixCount(double* counts, const float* x, size_t n, int shift, uint32_t prefix) {
  for (size_t i = 0; i < n; ++i) {
    uint32_t key;
    std::memcpy(&key, &x[i], sizeof key);
    if (shift == 24 || (key >> (shift + 8)) == prefix) counts[(key >> shift) & 255u] += 1;
  }
}

// The defaults: the host reference through a copy (the CPU backend's buffers are host
// memory; the CUDA backend has kernels, massive.cu).
void Backend::AbsTop3(float* keep, double* out, const float* x, size_t n) {
  std::vector<float> h(n);
  if (n > 0) ToHost(h.data(), x, n * sizeof(float));
  double top[4];
  HostAbsTop3(h.data(), n, top);
  if (n > 0) ToDevice(keep, h.data(), n * sizeof(float));
  ToDevice(out, top, sizeof top);
}

void Backend::RadixCount(double* counts, const float* x, size_t n, int shift, uint32_t prefix) {
  std::vector<float> h(n);
  if (n > 0) ToHost(h.data(), x, n * sizeof(float));
  double c[256] = {};
  HostRadixCount(c, h.data(), n, shift, prefix);
  ToDevice(counts, c, sizeof c);
}

void Backend::AccumulateGlobalSumSquares(double* acc, const std::vector<std::pair<const float*, size_t>>& tensors) {
  for (const auto& [x, n] : tensors) AccumulateSumSquares(acc, x, n);
}

// The arms are an optional op (kAttentionArms): Model::Create refuses an arm on a backend
// that does not report it, so these defaults are never reached by a model.
namespace {
[[noreturn]] void NoArms(const Backend& b, const char* op) {
  std::fprintf(stderr, "sinkscope: backend %s does not implement %s (optional op kAttentionArms)\n", b.Name(), op);
  std::abort();
}
}  // namespace

size_t Backend::ArmAttentionWorkspaceFloats(int, int, int) const { return 0; }
void Backend::ArmAttentionForward(TensorView, float*, float*, float*, TensorView, TensorView, TensorView,
                                  const float*, int, int, int, int, int, const AttentionArmParams&) {
  NoArms(*this, "ArmAttentionForward");
}
void Backend::ArmAttentionBackward(float*, float*, float*, float*, const float*, TensorView, const float*,
                                   const float*, const float*, TensorView, TensorView, TensorView, const float*, int,
                                   int, int, int, int, const AttentionArmParams&) {
  NoArms(*this, "ArmAttentionBackward");
}
void Backend::ArmAttentionColumnStats(float*, float*, float*, float*, TensorView, TensorView, const float*, int, int,
                                      int, int, int, const AttentionArmParams&, const ColumnStatsRequest&) {
  NoArms(*this, "ArmAttentionColumnStats");
}
void Backend::SigmoidGateForward(TensorView, TensorView, const float*, int, int, int) {
  NoArms(*this, "SigmoidGateForward");
}
void Backend::SigmoidGateBackward(float*, float*, const float*, TensorView, const float*, int, int, int) {
  NoArms(*this, "SigmoidGateBackward");
}

}  // namespace sinkscope
