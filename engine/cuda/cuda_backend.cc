// The CUDA backend's host side: memory, the stream, cuBLASLt GEMMs, device tables, the
// sticky error, and the launchers of kernels/ behind the Backend interface. Every CUDA
// and cuBLAS call goes through CUDA_CALL / CUBLAS_CALL (the first failure is kept with
// the call, file and line, and handed out by TakeError once per step); every launch is
// followed by LAUNCHED(op), which checks cudaGetLastError and names the op.
#include "engine/cuda/cuda_backend.h"

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "engine/cuda/check.h"
#include "engine/cuda/kernels/kernels.h"

namespace sinkscope {
namespace {

using cuda::AdamWSegment;
using cuda::Segment;

constexpr size_t kGemmWorkspaceBytes = size_t{32} << 20;
// Tables kept on the device before the cache is dropped (a probe of many shapes).
constexpr size_t kMaxTables = 1024;

// In members of CudaBackend: keep the first failure, with the call as written.
#define CUDA_CALL(expr) Record((expr), #expr, __LINE__)
#define CUBLAS_CALL(expr) RecordBlas((expr), #expr, __LINE__)
#define LAUNCHED(op) Record(cudaGetLastError(), "kernel launch of " op, __LINE__)


class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {}
  cudaStream_t stream() const { return stream_; }
  int device() const { return device_; }
  ~CudaBackend() override {
    if (stream_ != nullptr) cudaStreamSynchronize(stream_);
    for (auto& [key, plan] : gemm_plans_) plan.Destroy();
    for (auto& [key, p] : tables_) cudaFree(p);
    for (auto& [key, p] : rope_tables_) cudaFree(p);
    for (void* p : {static_cast<void*>(gemm_workspace_), static_cast<void*>(partials_), scratch_.p, dscratch_.p,
                    column_scratch_.p, massive_scratch_.p}) {
      if (p != nullptr) cudaFree(p);
    }
    if (lt_ != nullptr) cublasLtDestroy(lt_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  Status Init() {
    RETURN_IF_ERROR(Must(cudaSetDevice(device_), "cudaSetDevice", __LINE__));
    RETURN_IF_ERROR(Must(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate", __LINE__));
    if (cublasStatus_t e = cublasLtCreate(&lt_); e != CUBLAS_STATUS_SUCCESS) {
      return InternalError(cuda::DescribeCublasError(e, "cublasLtCreate", __FILE__, __LINE__));
    }
    RETURN_IF_ERROR(Must(cudaMalloc(&gemm_workspace_, kGemmWorkspaceBytes), "cudaMalloc(gemm workspace)", __LINE__));
    RETURN_IF_ERROR(Must(cudaMalloc(&partials_, cuda::kReduceBlocks * sizeof(double)), "cudaMalloc(partials)", __LINE__));
    return OkStatus();
  }

  const char* Name() const override { return "cuda"; }
  // Every optional op: the attention arms (docs/design/ARMS.md) run through the tiled
  // kernel of flash_attention.cu.
  bool Supports(OptionalOp) const override { return true; }

  // --- memory ------------------------------------------------------------------------
  float* Alloc(size_t n) override { return static_cast<float*>(AllocBytes(std::max<size_t>(n, 1) * sizeof(float))); }
  int32_t* AllocInt(size_t n) override {
    return static_cast<int32_t*>(AllocBytes(std::max<size_t>(n, 1) * sizeof(int32_t)));
  }
  double* AllocScalars(size_t n) override {
    return static_cast<double*>(AllocBytes(std::max<size_t>(n, 1) * sizeof(double)));
  }
  void Free(void* p) override {
    if (p != nullptr) CUDA_CALL(cudaFree(p));
  }
  // From pageable memory cudaMemcpyAsync returns once the source is staged, so the
  // caller may reuse it at once; the copy is ordered with the stream's work.
  void ToDevice(void* dst, const void* src, size_t bytes) override {
    CUDA_CALL(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
  }
  void ToHost(void* dst, const void* src, size_t bytes) override {
    CUDA_CALL(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
    CUDA_CALL(cudaStreamSynchronize(stream_));
  }
  void Copy(float* dst, const float* src, size_t n) override {
    CUDA_CALL(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
  }
  void Fill(float* x, float value, size_t n) override {
    cuda::LaunchFill(stream_, x, value, n);
    LAUNCHED("Fill");
  }
  void ZeroScalars(double* s, size_t n) override { CUDA_CALL(cudaMemsetAsync(s, 0, n * sizeof(double), stream_)); }
  void ReadScalars(double* host, const double* s, size_t n) override { ToHost(host, s, n * sizeof(double)); }
  void Synchronize() override { CUDA_CALL(cudaStreamSynchronize(stream_)); }
  Status BindThread() override { return CudaBindThread(*this); }
  Status TakeError() override {
    const cudaError_t e = cudaStreamQuery(stream_);  // surfaces an asynchronous kernel fault
    if (e != cudaSuccess && e != cudaErrorNotReady) Record(e, "cudaStreamQuery", __LINE__);
    std::lock_guard<std::mutex> lock(error_mu_);
    Status s = std::move(error_);
    error_ = OkStatus();
    return s;
  }

  // --- elementwise and reductions -------------------------------------------------------
  void Axpy(float* y, float alpha, const float* x, size_t n) override {
    cuda::LaunchAxpy(stream_, y, alpha, x, n);
    LAUNCHED("Axpy");
  }
  void Scale(float* x, float s, size_t n) override {
    cuda::LaunchScale(stream_, x, s, n);
    LAUNCHED("Scale");
  }
  void AddRowBias(TensorView x_v, const float* b, int N, int n) override {
    float* x = x_v.f32("cuda AddRowBias");
    cuda::LaunchAddRowBias(stream_, x, b, N, n);
    LAUNCHED("AddRowBias");
  }
  void AccumulateColumnSums(float* acc, const float* x, int N, int n) override {
    float* partials = ColumnPartials(N, n);
    if (partials == nullptr) return;
    cuda::LaunchColumnSums(stream_, acc, x, N, n, partials);
    LAUNCHED("AccumulateColumnSums");
  }
  void AccumulateSumSquares(double* acc, const float* x, size_t n) override {
    AccumulateGlobalSumSquares(acc, {{x, n}});
  }
  void AccumulateGlobalSumSquares(double* acc,
                                  const std::vector<std::pair<const float*, size_t>>& tensors) override {
    std::vector<Segment> segs;
    size_t total = 0;
    for (const auto& [p, n] : tensors) {
      if (n == 0) continue;
      segs.push_back({p, n});
      total += n;
    }
    if (segs.empty()) return;
    const auto* table = static_cast<const Segment*>(DeviceTable(segs.data(), segs.size() * sizeof(Segment)));
    if (table == nullptr) return;
    cuda::LaunchSumSquares(stream_, acc, table, static_cast<int>(segs.size()), total, partials_);
    LAUNCHED("AccumulateSumSquares");
  }
  void AccumulateTokenSum(float* acc, const float* x, int B, int T, int C, int P) override {
    cuda::LaunchTokenSum(stream_, acc, x, B, T, C, P);
    LAUNCHED("AccumulateTokenSum");
  }
  void AccumulateTokenNormSum(float* acc, TensorView x_v, int B, int T, int G, int C, int P) override {
    const float* x = x_v.f32("cuda AccumulateTokenNormSum");
    cuda::LaunchTokenNormSum(stream_, acc, x, B, T, G, C, P);
    LAUNCHED("AccumulateTokenNormSum");
  }

  void AbsTop3(float* keep, double* out, const float* x, size_t n) override {
    void* scratch = Scratch(&massive_scratch_, cuda::MassiveScratchBytes());
    if (scratch == nullptr) return;
    cuda::LaunchAbsTop3(stream_, keep, out, x, n, scratch);
    LAUNCHED("AbsTop3");
  }
  void RadixCount(double* counts, const float* x, size_t n, int shift, uint32_t prefix) override {
    void* scratch = Scratch(&massive_scratch_, cuda::MassiveScratchBytes());
    if (scratch == nullptr) return;
    cuda::LaunchRadixCount(stream_, counts, x, n, shift, prefix, scratch);
    LAUNCHED("RadixCount");
  }

  // --- matmul ------------------------------------------------------------------------------
  // Row-major C(m,n) = op(A)·op(B) is column-major Cᵀ(n,m) = op(B)ᵀ·op(A)ᵀ: cuBLASLt gets
  // B as its first operand and A as its second, each with the same transpose flag.
  void Gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, TensorView a_v, TensorView b_v, float beta,
            TensorView c_v) override {
    const float* a = a_v.f32("cuda Gemm");
    const float* b = b_v.f32("cuda Gemm");
    float* c = c_v.f32("cuda Gemm");
    if (m == 0 || n == 0) return;
    // Weights and gradients sit at any float offset of the parameter buffer: the plan is
    // chosen for the operands' actual alignment (cuBLASLt otherwise assumes 256 bytes and
    // may pick a vectorised kernel that faults on a 4-byte-aligned pointer).
    GemmPlan* plan = Plan(trans_a, trans_b, m, n, k, Alignment(b), Alignment(a), Alignment(c));
    if (plan == nullptr) return;
    CUBLAS_CALL(cublasLtMatmul(lt_, plan->desc, &alpha, b, plan->a, a, plan->b, &beta, c, plan->c, c, plan->c,
                               &plan->algo, gemm_workspace_, kGemmWorkspaceBytes, stream_));
  }

  // --- model ops ------------------------------------------------------------------------------
  void EmbeddingForward(float* out, const int32_t* tokens, const float* table, int N, int d) override {
    cuda::LaunchEmbeddingForward(stream_, out, tokens, table, N, d);
    LAUNCHED("EmbeddingForward");
  }
  void EmbeddingBackward(float* dtable, const float* dout, const int32_t* tokens, int N, int d) override {
    cuda::LaunchEmbeddingBackward(stream_, dtable, dout, tokens, N, d);
    LAUNCHED("EmbeddingBackward");
  }
  void RmsNormForward(TensorView out_v, float* rstd, TensorView x_v, const float* gamma, int N, int d, float eps) override {
    float* out = out_v.f32("cuda RmsNormForward");
    const float* x = x_v.f32("cuda RmsNormForward");
    cuda::LaunchRmsNormForward(stream_, nullptr, out, rstd, x, nullptr, gamma, N, d, eps);
    LAUNCHED("RmsNormForward");
  }
  void ResidualRmsNormForward(float* sum, TensorView out_v, float* rstd, const float* x, const float* r, const float* gamma,
                              int N, int d, float eps) override {
    float* out = out_v.f32("cuda ResidualRmsNormForward");
    cuda::LaunchRmsNormForward(stream_, sum, out, rstd, x, r, gamma, N, d, eps);
    LAUNCHED("ResidualRmsNormForward");
  }
  void RmsNormBackward(float* dx, float* dgamma, const float* dout, TensorView x_v, const float* gamma,
                       const float* rstd, int N, int d) override {
    const float* x = x_v.f32("cuda RmsNormBackward");
    float* partials = ColumnPartials(N, d);
    if (partials == nullptr) return;
    cuda::LaunchRmsNormBackward(stream_, dx, dgamma, dx, dout, x, gamma, rstd, N, d, partials);
    LAUNCHED("RmsNormBackward");
  }
  void RmsNormBackwardResidual(float* dx, float* dgamma, const float* d_residual, const float* dout, const float* x,
                               const float* gamma, const float* rstd, int N, int d) override {
    float* partials = ColumnPartials(N, d);
    if (partials == nullptr) return;
    cuda::LaunchRmsNormBackward(stream_, dx, dgamma, d_residual, dout, x, gamma, rstd, N, d, partials);
    LAUNCHED("RmsNormBackwardResidual");
  }

  void RopeForward(TensorView x_v, int B, int T, int heads, int dh, const RotaryFrequencies& rope) override {
    float* x = x_v.f32("cuda RopeForward");
    Rope(x, B, T, heads, dh, rope, 1.0);
  }
  void RopeBackward(float* dx, int B, int T, int heads, int dh, const RotaryFrequencies& rope) override {
    Rope(dx, B, T, heads, dh, rope, -1.0);
  }

  // Flash attention (kernels/flash_attention.cu): the backward recomputes P from q, k and
  // the lse, so no workspace; its only scratch is D (B,H,T).
  size_t AttentionWorkspaceFloats(int, int, int) const override { return 0; }
  void AttentionForward(TensorView y_v, float* lse, float* /*workspace*/, TensorView q_v, TensorView k_v, TensorView v_v,
                        int B, int T, int H, int KV, int dh) override {
    float* y = y_v.f32("cuda AttentionForward");
    const float* q = q_v.f32("cuda AttentionForward");
    const float* k = k_v.f32("cuda AttentionForward");
    const float* v = v_v.f32("cuda AttentionForward");
    if (!HeadDimSupported(dh)) return;
    cuda::LaunchFlashAttentionForward(stream_, y, lse, q, k, v, B, T, H, KV, dh);
    LAUNCHED("AttentionForward");
  }
  void AttentionBackward(float* dq, float* dk, float* dv, const float* dy, TensorView y_v, const float* lse,
                         const float* /*workspace*/, TensorView q_v, TensorView k_v, TensorView v_v, int B, int T, int H,
                         int KV, int dh) override {
    const float* y = y_v.f32("cuda AttentionBackward");
    const float* q = q_v.f32("cuda AttentionBackward");
    const float* k = k_v.f32("cuda AttentionBackward");
    const float* v = v_v.f32("cuda AttentionBackward");
    if (!HeadDimSupported(dh)) return;
    float* D = static_cast<float*>(Scratch(&scratch_, std::max<size_t>(static_cast<size_t>(B) * H * T, 1) * sizeof(float)));
    if (D == nullptr) return;
    cuda::LaunchFlashAttentionBackward(stream_, dq, dk, dv, D, dy, y, lse, q, k, v, B, T, H, KV, dh);
    LAUNCHED("AttentionBackward");
  }
  void AttentionColumnStats(float* alpha, float* mass, float* second_moment, float* per_sample_rate, TensorView q_v,
                            TensorView k_v, const float* lse, int B, int T, int H, int KV, int dh,
                            const ColumnStatsRequest& request) override {
    if (ColumnStats(alpha, mass, second_moment, per_sample_rate, q_v.f32("cuda AttentionColumnStats"),
                    k_v.f32("cuda AttentionColumnStats"), lse, nullptr, B, T, H, KV, dh, request, cuda::FlashArm{})) {
      LAUNCHED("AttentionColumnStats");
    }
  }
  // Column s of the attention matrix for the probes, recomputed from q, k and each row's
  // numbers (r0: the lse, or softpick's m; r1: softpick's D') by the arm's formula. False
  // when its scratch could not be had (the error is recorded).
  bool ColumnStats(float* alpha, float* mass, float* second_moment, float* per_sample_rate, const float* q,
                   const float* k, const float* r0, const float* r1, int B, int T, int H, int KV, int dh,
                   const ColumnStatsRequest& request, const cuda::FlashArm& arm) {
    const int s = request.sink_position;
    const int window = std::min(request.window, T - s);
    double* per_b = static_cast<double*>(Scratch(&dscratch_, static_cast<size_t>(H) * B * 3 * sizeof(double)));
    if (per_b == nullptr) return false;
    cuda::LaunchColumnStats(stream_, alpha, mass, second_moment, per_sample_rate, per_b, q, k, r0, r1, B, T, H, KV, dh,
                            s, window, request.threshold, arm);
    return true;
  }

  // --- attention arms (docs/design/ARMS.md) through the tiled kernel ------------------
  // A is never stored: the workspace keeps two numbers per row (B,H,T each), r0 (the lse,
  // the sink column included; softpick's shift m) and r1 (softpick's D'), from which the
  // backward and the probes recompute any weight.
  bool ArmAttentionKeepsWeights() const override { return false; }
  size_t ArmAttentionWorkspaceFloats(int B, int T, int H) const override {
    return 2 * static_cast<size_t>(B) * H * T;
  }
  static cuda::FlashArm DeviceArm(const AttentionArmParams& arm, const float* sink) {
    cuda::FlashArm a;
    switch (arm.kind) {
      case AttentionKind::kSoftmax: break;
      case AttentionKind::kSinkLogit: a.has_sink = true, a.sink = sink; break;
      case AttentionKind::kSoftmaxPlusOne: a.has_sink = true; break;  // s_h = 0: no tensor
      case AttentionKind::kSigmoid: a.family = cuda::kFlashSigmoid, a.bias = arm.sigmoid_bias; break;
      case AttentionKind::kSoftpick: a.family = cuda::kFlashSoftpick, a.eps = arm.softpick_eps; break;
    }
    return a;
  }
  void ArmAttentionForward(TensorView y_v, float* /*att*/, float* unassigned, float* ws, TensorView q_v, TensorView k_v,
                           TensorView v_v, const float* sink, int B, int T, int H, int KV, int dh,
                           const AttentionArmParams& arm) override {
    float* y = y_v.f32("cuda ArmAttentionForward");
    const float* q = q_v.f32("cuda ArmAttentionForward");
    const float* k = k_v.f32("cuda ArmAttentionForward");
    const float* v = v_v.f32("cuda ArmAttentionForward");
    if (!HeadDimSupported(dh)) return;
    const size_t rows = static_cast<size_t>(B) * H * T;
    cuda::LaunchFlashArmForward(stream_, y, ws, ws + rows, unassigned, q, k, v, B, T, H, KV, dh, DeviceArm(arm, sink));
    LAUNCHED("ArmAttentionForward");
  }
  void ArmAttentionBackward(float* dq, float* dk, float* dv, float* dsink, const float* dy, TensorView y_v,
                            const float* /*att*/, const float* unassigned, const float* ws, TensorView q_v,
                            TensorView k_v, TensorView v_v, const float* sink, int B, int T, int H, int KV, int dh,
                            const AttentionArmParams& arm) override {
    const float* y = y_v.f32("cuda ArmAttentionBackward");
    const float* q = q_v.f32("cuda ArmAttentionBackward");
    const float* k = k_v.f32("cuda ArmAttentionBackward");
    const float* v = v_v.f32("cuda ArmAttentionBackward");
    if (!HeadDimSupported(dh)) return;
    const size_t rows = static_cast<size_t>(B) * H * T;
    float* D = static_cast<float*>(Scratch(&scratch_, std::max<size_t>(rows, 1) * sizeof(float)));
    if (D == nullptr) return;
    const cuda::FlashArm a = DeviceArm(arm, sink);
    cuda::LaunchFlashArmBackward(stream_, dq, dk, dv, D, arm.kind == AttentionKind::kSinkLogit ? dsink : nullptr, dy,
                                 y, ws, ws + rows, unassigned, q, k, v, B, T, H, KV, dh, a);
    LAUNCHED("ArmAttentionBackward");
  }
  void ArmAttentionColumnStats(float* alpha, float* mass, float* second_moment, float* per_sample_rate,
                               TensorView q_v, TensorView k_v, const float* ws, int B, int T, int H, int KV, int dh,
                               const AttentionArmParams& arm, const ColumnStatsRequest& request) override {
    const size_t rows = static_cast<size_t>(B) * H * T;
    if (ColumnStats(alpha, mass, second_moment, per_sample_rate, q_v.f32("cuda ArmAttentionColumnStats"),
                    k_v.f32("cuda ArmAttentionColumnStats"), ws, ws + rows, B, T, H, KV, dh, request,
                    DeviceArm(arm, nullptr))) {
      LAUNCHED("ArmAttentionColumnStats");
    }
  }
  void SigmoidGateForward(TensorView out_v, TensorView x_v, const float* logits, int N, int G, int C) override {
    float* out = out_v.f32("cuda SigmoidGateForward");
    const float* x = x_v.f32("cuda SigmoidGateForward");
    cuda::LaunchSigmoidGateForward(stream_, out, x, logits, N, G, C);
    LAUNCHED("SigmoidGateForward");
  }
  void SigmoidGateBackward(float* dx, float* dlogits, const float* dout, TensorView x_v, const float* logits, int N,
                           int G, int C) override {
    const float* x = x_v.f32("cuda SigmoidGateBackward");
    cuda::LaunchSigmoidGateBackward(stream_, dx, dlogits, dout, x, logits, N, G, C);
    LAUNCHED("SigmoidGateBackward");
  }

  void VScaleForward(TensorView vhat_v, TensorView v_v, const float* theta, int N, int KV, int dh, double c_base,
                     VScaleMode mode) override {
    float* vhat = vhat_v.f32("cuda VScaleForward");
    const float* v = v_v.f32("cuda VScaleForward");
    if (mode != VScaleMode::kVScale) {
      Copy(vhat, v, static_cast<size_t>(N) * KV * dh);
      return;
    }
    cuda::LaunchVScaleForward(stream_, vhat, v, theta, N, KV, dh, c_base);
    LAUNCHED("VScaleForward");
  }
  void VScaleBackward(float* dv, float* dtheta, const float* dvhat, TensorView v_v, const float* theta, int N, int KV,
                      int dh, double c_base, VScaleMode mode) override {
    const float* v = v_v.f32("cuda VScaleBackward");
    if (mode == VScaleMode::kNone) {
      Copy(dv, dvhat, static_cast<size_t>(N) * KV * dh);
      return;
    }
    double* rows = static_cast<double*>(Scratch(&dscratch_, cuda::ThetaScratchDoubles(N, KV) * sizeof(double)));
    if (rows == nullptr) return;
    const bool vscale = mode == VScaleMode::kVScale;
    cuda::LaunchVScaleBackward(stream_, dv, vscale ? dtheta : nullptr, rows, dvhat, v, vscale ? theta : nullptr, N,
                               KV, dh, c_base);
    LAUNCHED("VScaleBackward");
  }

  void SwiGluForward(TensorView h_v, TensorView gate_v, TensorView up_v, int N, int F) override {
    float* h = h_v.f32("cuda SwiGluForward");
    const float* gate = gate_v.f32("cuda SwiGluForward");
    const float* up = up_v.f32("cuda SwiGluForward");
    cuda::LaunchSwiGluForward(stream_, h, gate, up, static_cast<size_t>(N) * F);
    LAUNCHED("SwiGluForward");
  }
  void SwiGluBackward(float* dgate, float* dup, const float* dh, TensorView gate_v, TensorView up_v, int N,
                      int F) override {
    const float* gate = gate_v.f32("cuda SwiGluBackward");
    const float* up = up_v.f32("cuda SwiGluBackward");
    cuda::LaunchSwiGluBackward(stream_, dgate, dup, dh, gate, up, static_cast<size_t>(N) * F);
    LAUNCHED("SwiGluBackward");
  }

  void CrossEntropyForwardBackward(float* logits, const int32_t* targets, int N, int V, float grad_scale,
                                   double* loss_acc) override {
    double* rows = static_cast<double*>(Scratch(&dscratch_, std::max(N, 1) * sizeof(double)));
    if (rows == nullptr) return;
    cuda::LaunchCrossEntropy(stream_, logits, targets, N, V, true, grad_scale, rows, loss_acc);
    LAUNCHED("CrossEntropyForwardBackward");
  }
  void CrossEntropyLoss(const float* logits, const int32_t* targets, int N, int V, double* loss_acc) override {
    double* rows = static_cast<double*>(Scratch(&dscratch_, std::max(N, 1) * sizeof(double)));
    if (rows == nullptr) return;
    // Forward only: the kernel does not write the logits when grad is false.
    cuda::LaunchCrossEntropy(stream_, const_cast<float*>(logits), targets, N, V, false, 0.0f, rows, loss_acc);
    LAUNCHED("CrossEntropyLoss");
  }

  void AdamW(float* p, const float* g, float* m, float* v, size_t n, float lr, float beta1, float beta2, float eps,
             float weight_decay, float grad_scale, int64_t step) override {
    const AdamWSegment seg = AdamWSegmentOf(p, m, v, g, n, weight_decay);
    const auto* table = static_cast<const AdamWSegment*>(DeviceTable(&seg, sizeof seg));
    if (table == nullptr) return;
    const auto [bc1, bc2] = BiasCorrections(beta1, beta2, step);
    cuda::LaunchAdamW(stream_, table, 1, n, n, nullptr, 0, grad_scale, lr, beta1, beta2, eps, bc1, bc2);
    LAUNCHED("AdamW");
  }
  // One launch; the guard is read on the device (no host synchronisation).
  void MultiTensorAdamW(const std::vector<AdamWTensor>& tensors, const AdamWHyper& h, const double* guard) override {
    std::vector<AdamWSegment> segs;
    size_t max_n = 0, total_n = 0;
    for (const AdamWTensor& t : tensors) {
      if (t.n == 0) continue;
      segs.push_back(AdamWSegmentOf(t.p, t.m, t.v, t.g, t.n, t.weight_decay));
      max_n = std::max(max_n, t.n);
      total_n += t.n;
    }
    if (segs.empty()) return;
    const auto* table = static_cast<const AdamWSegment*>(DeviceTable(segs.data(), segs.size() * sizeof(AdamWSegment)));
    if (table == nullptr) return;
    const auto [bc1, bc2] = BiasCorrections(h.beta1, h.beta2, h.step);
    cuda::LaunchAdamW(stream_, table, static_cast<int>(segs.size()), max_n, total_n, guard, h.grad_clip, 1.0f, h.lr, h.beta1,
                      h.beta2, h.eps, bc1, bc2);
    LAUNCHED("MultiTensorAdamW");
  }

 private:
  // The cuBLASLt description of one GEMM shape, with the heuristic's algorithm.
  struct GemmPlan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
    void Destroy() {
      if (a) cublasLtMatrixLayoutDestroy(a);
      if (b) cublasLtMatrixLayoutDestroy(b);
      if (c) cublasLtMatrixLayoutDestroy(c);
      if (desc) cublasLtMatmulDescDestroy(desc);
    }
  };
  struct Buffer {
    void* p = nullptr;
    size_t bytes = 0;
  };

  bool Record(cudaError_t e, const char* call, int line) {
    if (e == cudaSuccess) return true;
    std::lock_guard<std::mutex> lock(error_mu_);
    if (error_.ok()) error_ = InternalError(cuda::DescribeCudaError(e, call, __FILE__, line));
    return false;
  }
  bool RecordBlas(cublasStatus_t e, const char* call, int line) {
    if (e == CUBLAS_STATUS_SUCCESS) return true;
    std::lock_guard<std::mutex> lock(error_mu_);
    if (error_.ok()) error_ = InternalError(cuda::DescribeCublasError(e, call, __FILE__, line));
    return false;
  }
  bool HeadDimSupported(int dh) {
    if (cuda::FlashAttentionSupports(dh)) return true;
    std::lock_guard<std::mutex> lock(error_mu_);
    if (error_.ok()) {
      error_ = InvalidArgumentError("cuda attention: head_dim " + std::to_string(dh) + " is not supported (1.." +
                                    std::to_string(cuda::kFlashAttentionMaxHeadDim) + ")");
    }
    return false;
  }
  static Status Must(cudaError_t e, const char* call, int line) {
    if (e == cudaSuccess) return OkStatus();
    return Status(e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver ? StatusCode::kFailedPrecondition
                                                                           : StatusCode::kInternal,
                  cuda::DescribeCudaError(e, call, __FILE__, line));
  }

  void* AllocBytes(size_t bytes) override {  // cudaMalloc: 256-byte aligned
    void* p = nullptr;
    if (const cudaError_t e = cudaMalloc(&p, bytes); e == cudaErrorMemoryAllocation) {
      // Out of memory is an answer (null: the caller names what did not fit), not a
      // device fault: clear it so that it is neither sticky nor seen by the next launch.
      cudaGetLastError();
      return nullptr;
    } else if (!CUDA_CALL(e)) {
      return nullptr;
    }
    if (!CUDA_CALL(cudaMemsetAsync(p, 0, bytes, stream_))) {
      cudaFree(p);
      return nullptr;
    }
    return p;
  }

  // The first pass's partials of a two-pass column sum over (N, n).
  float* ColumnPartials(int N, int n) {
    return static_cast<float*>(Scratch(&column_scratch_, std::max<size_t>(cuda::ColumnPartialsFloats(N, n), 1) * sizeof(float)));
  }

  // A device buffer of at least `bytes`, grown when needed (the stream is drained first:
  // queued kernels may still read the old one).
  void* Scratch(Buffer* buf, size_t bytes) {
    if (buf->bytes >= bytes) return buf->p;
    CUDA_CALL(cudaStreamSynchronize(stream_));
    if (buf->p != nullptr) cudaFree(buf->p);
    buf->p = nullptr;
    buf->bytes = 0;
    if (!CUDA_CALL(cudaMalloc(&buf->p, bytes))) return nullptr;
    buf->bytes = bytes;
    return buf->p;
  }

  // A device copy of a small host table (segments of a multi-tensor op), kept by its
  // bytes: the model passes the same tensors every step, so each table is uploaded once.
  const void* DeviceTable(const void* host, size_t bytes) {
    std::string key(static_cast<const char*>(host), bytes);
    auto it = tables_.find(key);
    if (it != tables_.end()) return it->second;
    if (tables_.size() >= kMaxTables) {  // queued kernels may still read them: drain first
      CUDA_CALL(cudaStreamSynchronize(stream_));
      for (auto& [k, p] : tables_) cudaFree(p);
      tables_.clear();
    }
    void* p = nullptr;
    if (!CUDA_CALL(cudaMalloc(&p, bytes))) return nullptr;
    if (!CUDA_CALL(cudaMemcpyAsync(p, host, bytes, cudaMemcpyHostToDevice, stream_))) return nullptr;
    tables_.emplace(std::move(key), p);
    return p;
  }

  // A segment with its padding zeroed: device tables are cached by their bytes.
  static AdamWSegment AdamWSegmentOf(float* p, float* m, float* v, const float* g, size_t n, float weight_decay) {
    AdamWSegment s;
    std::memset(&s, 0, sizeof s);
    s.p = p;
    s.m = m;
    s.v = v;
    s.g = g;
    s.n = n;
    s.weight_decay = weight_decay;
    return s;
  }

  static std::pair<double, double> BiasCorrections(float beta1, float beta2, int64_t step) {
    return {1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step)),
            1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step))};
  }

  // (cos, sin) per (t, j), computed in double exactly as the CPU backend, cached by
  // everything they depend on.
  void Rope(float* x, int B, int T, int heads, int dh, const RotaryFrequencies& rope, double sign) {
    const int half = dh / 2;
    std::string key(reinterpret_cast<const char*>(&T), sizeof T);
    key.append(reinterpret_cast<const char*>(&half), sizeof half);
    key.append(reinterpret_cast<const char*>(&sign), sizeof sign);
    key.append(reinterpret_cast<const char*>(&rope.attention_factor), sizeof rope.attention_factor);
    key.append(reinterpret_cast<const char*>(rope.inv_freq.data()), half * sizeof(rope.inv_freq[0]));
    auto it = rope_tables_.find(key);
    if (it == rope_tables_.end()) {
      std::vector<float> cs(static_cast<size_t>(T) * half * 2);
      for (int t = 0; t < T; ++t) {
        for (int i = 0; i < half; ++i) {
          const double ang = static_cast<double>(t) * rope.inv_freq[i];
          cs[(static_cast<size_t>(t) * half + i) * 2] = static_cast<float>(rope.attention_factor * std::cos(ang));
          cs[(static_cast<size_t>(t) * half + i) * 2 + 1] =
              static_cast<float>(sign * rope.attention_factor * std::sin(ang));
        }
      }
      void* p = nullptr;
      if (!CUDA_CALL(cudaMalloc(&p, cs.size() * sizeof(float)))) return;
      if (!CUDA_CALL(cudaMemcpyAsync(p, cs.data(), cs.size() * sizeof(float), cudaMemcpyHostToDevice, stream_))) {
        return;
      }
      it = rope_tables_.emplace(std::move(key), p).first;
    }
    cuda::LaunchRope(stream_, x, static_cast<const float2*>(it->second), B, T, heads, dh);
    LAUNCHED("Rope");
  }

  // The largest power of two ≤ 256 dividing the address.
  static uint32_t Alignment(const void* p) {
    const auto bits = reinterpret_cast<uintptr_t>(p);
    uint32_t a = 256;
    while (a > 4 && bits % a != 0) a /= 2;
    return a;
  }

  // align_a/b/c: of cuBLASLt's A (our B), B (our A) and C = D (our C), in bytes.
  GemmPlan* Plan(bool ta, bool tb, int m, int n, int k, uint32_t align_a, uint32_t align_b, uint32_t align_c) {
    const auto key = std::make_tuple(ta, tb, m, n, k, align_a, align_b, align_c);
    auto it = gemm_plans_.find(key);
    if (it != gemm_plans_.end()) return &it->second;
    GemmPlan plan;
    const cublasOperation_t op_a = tb ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLASLt's A is our B
    const cublasOperation_t op_b = ta ? CUBLAS_OP_T : CUBLAS_OP_N;  // and its B our A
    bool ok = CUBLAS_CALL(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F)) &&
              CUBLAS_CALL(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof op_a)) &&
              CUBLAS_CALL(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof op_b)) &&
              // Our B, row-major (k,n) [or (n,k) when transposed], is column-major (n,k) [(k,n)].
              CUBLAS_CALL(cublasLtMatrixLayoutCreate(&plan.a, CUDA_R_32F, tb ? k : n, tb ? n : k, tb ? k : n)) &&
              CUBLAS_CALL(cublasLtMatrixLayoutCreate(&plan.b, CUDA_R_32F, ta ? m : k, ta ? k : m, ta ? m : k)) &&
              CUBLAS_CALL(cublasLtMatrixLayoutCreate(&plan.c, CUDA_R_32F, n, m, n));
    cublasLtMatmulPreference_t pref = nullptr;
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    ok = ok && CUBLAS_CALL(cublasLtMatmulPreferenceCreate(&pref)) &&
         CUBLAS_CALL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                          &kGemmWorkspaceBytes, sizeof kGemmWorkspaceBytes)) &&
         CUBLAS_CALL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a,
                                                          sizeof align_a)) &&
         CUBLAS_CALL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b,
                                                          sizeof align_b)) &&
         CUBLAS_CALL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c,
                                                          sizeof align_c)) &&
         CUBLAS_CALL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c,
                                                          sizeof align_c)) &&
         CUBLAS_CALL(cublasLtMatmulAlgoGetHeuristic(lt_, plan.desc, plan.a, plan.b, plan.c, plan.c, pref, 1, &result,
                                                    &found));
    if (pref != nullptr) cublasLtMatmulPreferenceDestroy(pref);
    if (ok && found == 0) ok = RecordBlas(CUBLAS_STATUS_NOT_SUPPORTED, "cublasLtMatmulAlgoGetHeuristic (no algorithm)", __LINE__);
    if (!ok) {
      plan.Destroy();
      return nullptr;
    }
    plan.algo = result.algo;
    return &gemm_plans_.emplace(key, plan).first->second;
  }

  const int device_;
  cudaStream_t stream_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  void* gemm_workspace_ = nullptr;
  double* partials_ = nullptr;
  Buffer scratch_, dscratch_, column_scratch_, massive_scratch_;
  std::map<std::tuple<bool, bool, int, int, int, uint32_t, uint32_t, uint32_t>, GemmPlan> gemm_plans_;
  std::map<std::string, void*> tables_, rope_tables_;
  std::mutex error_mu_;
  Status error_;
};

}  // namespace

int CudaDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear it: no driver or no device is an answer here, not an error
    return 0;
  }
  return n;
}

StatusOr<CudaDeviceInfo> DescribeCudaDevice(int index) {
  int n = 0;
  if (cudaError_t e = cudaGetDeviceCount(&n); e != cudaSuccess) {
    cudaGetLastError();
    return FailedPreconditionError("no CUDA device: " + std::string(cudaGetErrorString(e)));
  }
  if (index < 0 || index >= n) {
    return FailedPreconditionError("CUDA device " + std::to_string(index) + " does not exist (this machine has " +
                                   std::to_string(n) + ")");
  }
  cudaDeviceProp prop{};
  if (cudaError_t e = cudaGetDeviceProperties(&prop, index); e != cudaSuccess) {
    return InternalError(cuda::DescribeCudaError(e, "cudaGetDeviceProperties", __FILE__, __LINE__));
  }
  CudaDeviceInfo info;
  info.index = index;
  info.name = prop.name;
  info.total_memory = prop.totalGlobalMem;
  info.compute_major = prop.major;
  info.compute_minor = prop.minor;
  info.multiprocessors = prop.multiProcessorCount;
  return info;
}

Status CudaBindThread(Backend& backend) {
  auto* cuda = dynamic_cast<CudaBackend*>(&backend);
  if (cuda == nullptr) return OkStatus();
  if (cudaError_t e = cudaSetDevice(cuda->device()); e != cudaSuccess) {
    cudaGetLastError();
    return InternalError(cuda::DescribeCudaError(e, "cudaSetDevice", __FILE__, __LINE__));
  }
  return OkStatus();
}

void* CudaStreamOf(Backend& backend) {
  auto* cuda = dynamic_cast<CudaBackend*>(&backend);
  return cuda != nullptr ? static_cast<void*>(cuda->stream()) : nullptr;
}

StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int index) {
  ASSIGN_OR_RETURN(CudaDeviceInfo info, DescribeCudaDevice(index));
  (void)info;
  auto be = std::make_unique<CudaBackend>(index);
  RETURN_IF_ERROR(be->Init());
  return std::unique_ptr<Backend>(std::move(be));
}

}  // namespace sinkscope
