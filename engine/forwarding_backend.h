// Decorators of a Backend.
//
// ForwardingBackend forwards every primitive op to another backend and overrides no fused
// op, so the fused ops run Backend's default composition over the other backend's
// primitives: the bf16 mode's rounding layer (cpu/bf16_mode.cc) rounds inside the
// composition, and tests use it as is to compare fused ops with their composition.
//
// FullForwardingBackend forwards the fused ops too: a decorator that changes only the
// ops it overrides and leaves the other backend's fused kernels in place (the bf16
// mode's storage layer; a test's one-op mutation).
#pragma once

#include <memory>
#include <utility>
#include <vector>

#include "engine/backend.h"

namespace sinkscope {

class ForwardingBackend : public Backend {
 public:
  explicit ForwardingBackend(std::unique_ptr<Backend> inner) : owned_(std::move(inner)), in_(owned_.get()) {}
  explicit ForwardingBackend(Backend* inner) : in_(inner) {}
  const char* Name() const override { return in_->Name(); }
  bool Supports(OptionalOp op) const override { return in_->Supports(op); }
  float* Alloc(size_t n) override { return in_->Alloc(n); }
  void* AllocBytes(size_t bytes) override { return in_->AllocBytes(bytes); }
  DType ActivationDType() const override { return in_->ActivationDType(); }
  size_t LmHeadChunkLogits() const override { return in_->LmHeadChunkLogits(); }
  int32_t* AllocInt(size_t n) override { return in_->AllocInt(n); }
  void Free(void* p) override { in_->Free(p); }
  void ToDevice(void* d, const void* s, size_t b) override { in_->ToDevice(d, s, b); }
  void ToHost(void* d, const void* s, size_t b) override { in_->ToHost(d, s, b); }
  void Copy(float* d, const float* s, size_t n) override { in_->Copy(d, s, n); }
  void Fill(float* x, float v, size_t n) override { in_->Fill(x, v, n); }
  double* AllocScalars(size_t n) override { return in_->AllocScalars(n); }
  void ZeroScalars(double* s, size_t n) override { in_->ZeroScalars(s, n); }
  void ReadScalars(double* h, const double* s, size_t n) override { in_->ReadScalars(h, s, n); }
  void Synchronize() override { in_->Synchronize(); }
  Status TakeError() override { return in_->TakeError(); }
  Status BindThread() override { return in_->BindThread(); }
  void Axpy(float* y, float a, const float* x, size_t n) override { in_->Axpy(y, a, x, n); }
  void Scale(float* x, float s, size_t n) override { in_->Scale(x, s, n); }
  void AddRowBias(TensorView x, const float* b, int N, int n) override { in_->AddRowBias(x, b, N, n); }
  void AccumulateColumnSums(float* a, const float* x, int N, int n) override { in_->AccumulateColumnSums(a, x, N, n); }
  void AccumulateSumSquares(double* a, const float* x, size_t n) override { in_->AccumulateSumSquares(a, x, n); }
  void AccumulateTokenSum(float* a, const float* x, int B, int T, int C, int P) override {
    in_->AccumulateTokenSum(a, x, B, T, C, P);
  }
  void AccumulateTokenNormSum(float* a, TensorView x, int B, int T, int G, int C, int P) override {
    in_->AccumulateTokenNormSum(a, x, B, T, G, C, P);
  }
  void AbsTop3(float* keep, double* out, const float* x, size_t n) override { in_->AbsTop3(keep, out, x, n); }
  void RadixCount(double* counts, const float* x, size_t n, int shift, uint32_t prefix) override {
    in_->RadixCount(counts, x, n, shift, prefix);
  }
  void Gemm(bool ta, bool tb, int m, int n, int k, float alpha, TensorView a, TensorView b, float beta,
            TensorView c) override {
    in_->Gemm(ta, tb, m, n, k, alpha, a, b, beta, c);
  }
  void EmbeddingForward(float* o, const int32_t* t, const float* tab, int N, int d) override {
    in_->EmbeddingForward(o, t, tab, N, d);
  }
  void EmbeddingBackward(float* dt, const float* g, const int32_t* t, int N, int d) override {
    in_->EmbeddingBackward(dt, g, t, N, d);
  }
  void RmsNormForward(TensorView o, float* r, TensorView x, const float* g, int N, int d, float e) override {
    in_->RmsNormForward(o, r, x, g, N, d, e);
  }
  void RmsNormBackward(float* dx, float* dg, const float* go, TensorView x, const float* g, const float* r, int N,
                       int d) override {
    in_->RmsNormBackward(dx, dg, go, x, g, r, N, d);
  }
  void RopeForward(TensorView x, int B, int T, int h, int dh, const RotaryFrequencies& r) override {
    in_->RopeForward(x, B, T, h, dh, r);
  }
  void RopeBackward(float* x, int B, int T, int h, int dh, const RotaryFrequencies& r) override {
    in_->RopeBackward(x, B, T, h, dh, r);
  }
  size_t AttentionWorkspaceFloats(int B, int T, int H) const override { return in_->AttentionWorkspaceFloats(B, T, H); }
  void AttentionForward(TensorView y, float* lse, float* ws, TensorView q, TensorView k, TensorView v, int B, int T,
                        int H, int KV, int dh) override {
    in_->AttentionForward(y, lse, ws, q, k, v, B, T, H, KV, dh);
  }
  void AttentionBackward(float* dq, float* dk, float* dv, const float* dy, TensorView y, const float* lse,
                         const float* ws, TensorView q, TensorView k, TensorView v, int B, int T, int H, int KV,
                         int dh) override {
    in_->AttentionBackward(dq, dk, dv, dy, y, lse, ws, q, k, v, B, T, H, KV, dh);
  }
  void AttentionColumnStats(float* a, float* m, float* s2, float* r, TensorView q, TensorView k, const float* lse,
                            int B, int T, int H, int KV, int dh, const ColumnStatsRequest& req) override {
    in_->AttentionColumnStats(a, m, s2, r, q, k, lse, B, T, H, KV, dh, req);
  }
  bool ArmAttentionKeepsWeights() const override { return in_->ArmAttentionKeepsWeights(); }
  size_t ArmAttentionWorkspaceFloats(int B, int T, int H) const override {
    return in_->ArmAttentionWorkspaceFloats(B, T, H);
  }
  void ArmAttentionForward(TensorView y, float* att, float* un, float* ws, TensorView q, TensorView k, TensorView v,
                           const float* sink, int B, int T, int H, int KV, int dh,
                           const AttentionArmParams& arm) override {
    in_->ArmAttentionForward(y, att, un, ws, q, k, v, sink, B, T, H, KV, dh, arm);
  }
  void ArmAttentionBackward(float* dq, float* dk, float* dv, float* ds, const float* dy, TensorView y,
                            const float* att, const float* un, const float* ws, TensorView q, TensorView k,
                            TensorView v, const float* sink, int B, int T, int H, int KV, int dh,
                            const AttentionArmParams& arm) override {
    in_->ArmAttentionBackward(dq, dk, dv, ds, dy, y, att, un, ws, q, k, v, sink, B, T, H, KV, dh, arm);
  }
  void ArmAttentionColumnStats(float* a, float* m, float* s2, float* r, TensorView q, TensorView k, const float* ws,
                               int B, int T, int H, int KV, int dh, const AttentionArmParams& arm,
                               const ColumnStatsRequest& req) override {
    in_->ArmAttentionColumnStats(a, m, s2, r, q, k, ws, B, T, H, KV, dh, arm, req);
  }
  void SigmoidGateForward(TensorView o, TensorView x, const float* l, int N, int G, int C) override {
    in_->SigmoidGateForward(o, x, l, N, G, C);
  }
  void SigmoidGateBackward(float* dx, float* dl, const float* d, TensorView x, const float* l, int N, int G,
                           int C) override {
    in_->SigmoidGateBackward(dx, dl, d, x, l, N, G, C);
  }
  void VScaleForward(TensorView vh, TensorView v, const float* th, int N, int KV, int dh, double c,
                     VScaleMode mode) override {
    in_->VScaleForward(vh, v, th, N, KV, dh, c, mode);
  }
  void VScaleBackward(float* dv, float* dth, const float* dvh, TensorView v, const float* th, int N, int KV, int dh,
                      double c, VScaleMode mode) override {
    in_->VScaleBackward(dv, dth, dvh, v, th, N, KV, dh, c, mode);
  }
  void SwiGluForward(TensorView h, TensorView g, TensorView u, int N, int F) override { in_->SwiGluForward(h, g, u, N, F); }
  void SwiGluBackward(float* dg, float* du, const float* dh, TensorView g, TensorView u, int N, int F) override {
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

 protected:
  Backend& inner() { return *in_; }
  const Backend& inner() const { return *in_; }

 private:
  std::unique_ptr<Backend> owned_;
  Backend* in_;
};

class FullForwardingBackend : public ForwardingBackend {
 public:
  using ForwardingBackend::ForwardingBackend;
  void ResidualRmsNormForward(float* sum, TensorView out, float* rstd, const float* x, const float* r,
                              const float* gamma, int N, int d, float eps) override {
    inner().ResidualRmsNormForward(sum, out, rstd, x, r, gamma, N, d, eps);
  }
  void RmsNormBackwardResidual(float* dx, float* dgamma, const float* d_residual, const float* dout, const float* x,
                               const float* gamma, const float* rstd, int N, int d) override {
    inner().RmsNormBackwardResidual(dx, dgamma, d_residual, dout, x, gamma, rstd, N, d);
  }
  void AttentionInputForward(const AttentionShape& s, TensorView xn, const AttentionInputWeights& w,
                             const AttentionInputActs& a) override {
    inner().AttentionInputForward(s, xn, w, a);
  }
  void AttentionInputBackward(const AttentionShape& s, float* dxn, float* dq, float* dk, const float* dv, TensorView xn,
                              const AttentionInputWeights& w, const AttentionInputActs& a, const AttentionInputGrads& g,
                              float* scratch_q, float* scratch_k) override {
    inner().AttentionInputBackward(s, dxn, dq, dk, dv, xn, w, a, g, scratch_q, scratch_k);
  }
  void GateUpSwiGluForward(TensorView act, TensorView gate, TensorView up, TensorView x, const float* w_gate,
                           const float* w_up, int N, int F, int d) override {
    inner().GateUpSwiGluForward(act, gate, up, x, w_gate, w_up, N, F, d);
  }
  void GateUpSwiGluBackward(float* dx, float* dw_gate, float* dw_up, float* d_gate, float* d_up, const float* d_act,
                            TensorView gate, TensorView up, TensorView x, const float* w_gate, const float* w_up,
                            int N, int F, int d) override {
    inner().GateUpSwiGluBackward(dx, dw_gate, dw_up, d_gate, d_up, d_act, gate, up, x, w_gate, w_up, N, F, d);
  }
  void LmHeadCrossEntropy(float* dx, float* dw, float* logits, int logits_rows, TensorView x, const float* w,
                          const int32_t* targets, int N, int V, int d, float grad_scale, double* loss_acc) override {
    inner().LmHeadCrossEntropy(dx, dw, logits, logits_rows, x, w, targets, N, V, d, grad_scale, loss_acc);
  }
  void LmHeadLoss(float* logits, int logits_rows, TensorView x, const float* w, const int32_t* targets, int N, int V,
                  int d, double* loss_acc) override {
    inner().LmHeadLoss(logits, logits_rows, x, w, targets, N, V, d, loss_acc);
  }
  void MultiTensorAdamW(const std::vector<AdamWTensor>& tensors, const AdamWHyper& h, const double* guard) override {
    inner().MultiTensorAdamW(tensors, h, guard);
  }
  void AccumulateGlobalSumSquares(double* acc, const std::vector<std::pair<const float*, size_t>>& tensors) override {
    inner().AccumulateGlobalSumSquares(acc, tensors);
  }
};

}  // namespace sinkscope
