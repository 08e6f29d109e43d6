// The CUDA backend's host side: memory, the stream, cuBLASLt GEMMs, device tables, the
// sticky error, and the launchers of kernels/ behind the Backend interface. Every CUDA
// and cuBLAS call goes through CUDA_CALL / CUBLAS_CALL (the first failure is kept with
// the call, file and line, and handed out by TakeError once per step); every launch is
// followed by LAUNCHED(op), which checks cudaGetLastError and names the op.
#include "engine/cuda/cuda_backend.h"

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <array>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "engine/cuda/check.h"
#include "engine/cuda/kernels/kernels.h"

// cuDNN's flash attention runs the bf16 step's attention on a GPU. The CPU emulation has
// no cuDNN: there (and wherever cuDNN has no plan) the tiled kernel runs.
#ifndef SINKSCOPE_CUDA_EMULATION
#include <cudnn_graph.h>

#include <cstdio>
#include <cstdlib>

#include "engine/cuda/cudnn_attention.h"
#define SINKSCOPE_CUDNN_ATTENTION 1
#endif

namespace sinkscope {
namespace {

using cuda::Act;
using cuda::AdamWSegment;
using cuda::Segment;

constexpr size_t kGemmWorkspaceBytes = size_t{32} << 20;
// Tables kept on the device before the cache is dropped (a probe of many shapes).
constexpr size_t kMaxTables = 1024;

// In members of CudaBackend: keep the first failure, with the call as written.
#define CUDA_CALL(expr) Record((expr), #expr, __LINE__)
#define CUBLAS_CALL(expr) RecordBlas((expr), #expr, __LINE__)
// A kernel may write any device memory: the converted GEMM operands are stale after it.
#define LAUNCHED(op) (++epoch_, Record(cudaGetLastError(), "kernel launch of " op, __LINE__))


class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, CudaPrecision precision) : device_(device), bf16_(precision == CudaPrecision::kBf16) {
    // SINKSCOPE_CUDA_PACKED=0: the bf16 step's q|k|v and gate|up projections as separate
    // GEMMs again (the packed path's cross-check in the tests).
    const char* packed = std::getenv("SINKSCOPE_CUDA_PACKED");
    packed_ = bf16_ && !(packed != nullptr && std::string(packed) == "0");
  }
  cudaStream_t stream() const { return stream_; }
  int device() const { return device_; }
#ifdef SINKSCOPE_CUDNN_ATTENTION
  bool ran_cudnn_attention() const { return !cudnn_used_.empty(); }
#else
  bool ran_cudnn_attention() const { return false; }
#endif
  ~CudaBackend() override {
    if (stream_ != nullptr) ReleaseScratch();  // drains the stream first
#ifdef SINKSCOPE_CUDNN_ATTENTION
    cudnn_cache_.reset();
    if (cudnn_ != nullptr) cudnnDestroy(cudnn_);
#endif
    for (auto& [key, plan] : gemm_plans_) plan.Destroy();
    for (auto& [key, p] : tables_) cudaFree(p);
    for (auto& [key, p] : rope_tables_) cudaFree(p);
    for (auto& [start, shadow] : shadows_) {
      if (shadow.owned) cudaFree(shadow.bf16);
    }
    for (auto& [start, mirror] : mirrors_) cudaFree(mirror);
    for (void* p : {static_cast<void*>(gemm_workspace_), static_cast<void*>(partials_)}) {
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
#ifdef SINKSCOPE_CUDNN_ATTENTION
    // bf16: attention through cuDNN unless SINKSCOPE_ATTENTION=tiled (the tiled kernel,
    // e.g. as the cross-check of cuDNN on a GPU); a handle that cannot be made leaves the
    // tiled kernel, said once.
    const char* choice = std::getenv("SINKSCOPE_ATTENTION");
    if (bf16_ && (choice == nullptr || std::string(choice) != "tiled")) {
      if (cudnnCreate(&cudnn_) != CUDNN_STATUS_SUCCESS) {
        cudnn_ = nullptr;
        std::fprintf(stderr, "sinkscope: cudnnCreate failed: attention runs in the tiled kernel\n");
      } else {
        auto target = cuda::DeviceTarget::FromHandle(cudnn_);
        if (target.ok()) {
          cudnn_cache_ = std::make_unique<cuda::CudnnAttentionCache>(std::move(*target));
        } else {
          std::fprintf(stderr, "sinkscope: cuDNN attention unavailable (%s): the tiled kernel runs\n",
                       target.status().message().c_str());
        }
      }
    }
#endif
    return OkStatus();
  }

  const char* Name() const override { return bf16_ ? "cuda-bf16" : "cuda"; }
  // Every optional op: the attention arms (docs/design/ARMS.md) run through the tiled
  // kernel of flash_attention.cu — in fp32 only, as on the CPU: the arms have no bf16
  // contract yet (ARMS.md), so the bf16 mode does not offer them.
  bool Supports(OptionalOp op) const override { return !(bf16_ && op == OptionalOp::kAttentionArms); }
  DType ActivationDType() const override { return bf16_ ? DType::kBF16 : DType::kF32; }
  // bf16: 2^27 logits (512 MB of fp32, and 256 MB of bf16 ∂L/∂logits beside them):
  // paper-0.1b's 16K tokens in 7 chunks instead of 50, so the head's ∂W (fp32, read and
  // written per chunk) and W cost 7 passes, not 50. fp32 (its GEMMs compute-bound at the
  // fp32 rate) keeps the CPU's 2^24.
  size_t LmHeadChunkLogits() const override { return bf16_ ? size_t{1} << 27 : size_t{1} << 24; }

  // --- memory ------------------------------------------------------------------------
  float* Alloc(size_t n) override { return static_cast<float*>(AllocBytes(std::max<size_t>(n, 1) * sizeof(float))); }
  int32_t* AllocInt(size_t n) override {
    return static_cast<int32_t*>(AllocBytes(std::max<size_t>(n, 1) * sizeof(int32_t)));
  }
  double* AllocScalars(size_t n) override {
    return static_cast<double*>(AllocBytes(std::max<size_t>(n, 1) * sizeof(double)));
  }
  void Free(void* p) override {
    if (p == nullptr) return;
    if (auto it = alloc_bytes_.find(p); it != alloc_bytes_.end()) {
      DropShadows(p, it->second);  // the bf16 copies of parameters that lived in it
      if (auto m = mirrors_.find(p); m != mirrors_.end()) {
        CUDA_CALL(cudaStreamSynchronize(stream_));  // queued GEMMs may still read it
        cudaFree(m->second);
        mirrors_.erase(m);
      }
      alloc_bytes_.erase(it);
    }
    CUDA_CALL(cudaFree(p));
  }
  // From pageable memory cudaMemcpyAsync returns once the source is staged, so the
  // caller may reuse it at once; the copy is ordered with the stream's work.
  void ToDevice(void* dst, const void* src, size_t bytes) override {
    Written(dst, bytes);
    CUDA_CALL(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
  }
  void ToHost(void* dst, const void* src, size_t bytes) override {
    CUDA_CALL(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
    CUDA_CALL(cudaStreamSynchronize(stream_));
  }
  void Copy(float* dst, const float* src, size_t n) override {
    Written(dst, n * sizeof(float));
    CUDA_CALL(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
  }
  void Fill(float* x, float value, size_t n) override {
    Written(x, n * sizeof(float));
    cuda::LaunchFill(stream_, x, value, n);
    LAUNCHED("Fill");
  }
  void ZeroScalars(double* s, size_t n) override {
    ++epoch_;
    CUDA_CALL(cudaMemsetAsync(s, 0, n * sizeof(double), stream_));
  }
  void ReadScalars(double* host, const double* s, size_t n) override { ToHost(host, s, n * sizeof(double)); }
  void Synchronize() override { CUDA_CALL(cudaStreamSynchronize(stream_)); }
  Status BindThread() override { return CudaBindThread(*this); }
  void ReleaseScratch() override {
    CUDA_CALL(cudaStreamSynchronize(stream_));  // queued kernels may still use them
    std::vector<Buffer*> buffers = {&scratch_, &dscratch_, &column_scratch_, &massive_scratch_, &qk_scratch_,
                                    &dlogits_, &swiglu_grads_, &rope_grads_, &packed_buf_};
#ifdef SINKSCOPE_CUDNN_ATTENTION
    for (Buffer* b : {&cudnn_workspace_, &cudnn_scratch_, &cudnn_grads_}) buffers.push_back(b);
#endif
    for (Converted& c : converted_) {
      buffers.push_back(&c.buf);
      c.x = nullptr;
    }
    for (Buffer* b : buffers) {
      if (b->p != nullptr) cudaFree(b->p);
      *b = Buffer{};
    }
  }
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
    Written(y, n * sizeof(float));
    cuda::LaunchAxpy(stream_, y, alpha, x, n);
    LAUNCHED("Axpy");
  }
  void Scale(float* x, float s, size_t n) override {
    Written(x, n * sizeof(float));
    cuda::LaunchScale(stream_, x, s, n);
    LAUNCHED("Scale");
  }
  void AddRowBias(TensorView x_v, const float* b, int N, int n) override {
    cuda::LaunchAddRowBias(stream_, A(x_v, "cuda AddRowBias"), b, N, n);
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
    cuda::LaunchTokenNormSum(stream_, acc, A(x_v, "cuda AccumulateTokenNormSum"), B, T, G, C, P);
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
  // fp32 mode: fp32 operands and compute (no TF32). bf16 mode: bf16 operands (a bf16 view
  // as stored; a parameter through its bf16 copy; any other fp32 operand converted into
  // scratch), fp32 accumulation, C in its view's dtype.
  void Gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, TensorView a_v, TensorView b_v, float beta,
            TensorView c_v) override {
    GemmWithBias(trans_a, trans_b, m, n, k, alpha, a_v, b_v, beta, c_v, nullptr);
  }
  // As Gemm, with bias(n) (fp32) added to every row of C by cuBLASLt's epilogue, before C
  // is stored (so a bf16 C is rounded once, after the bias). False when this cuBLASLt has
  // no such kernel (nothing was done: the caller adds the bias itself).
  bool GemmWithBias(bool trans_a, bool trans_b, int m, int n, int k, float alpha, TensorView a_v, TensorView b_v,
                    float beta, TensorView c_v, const float* bias) {
    return GemmBatched(trans_a, trans_b, m, n, k, alpha, a_v, 0, b_v, 0, beta, c_v, 0, 1, bias);
  }
  // As GemmWithBias, over `batch` products: item i reads A + i·stride_a, B + i·stride_b
  // and writes C + i·stride_c (strides in elements, ≥ 0; 0 shares an operand). One
  // cuBLASLt call (a strided batch): the bf16 step's gate|up projection is one GEMM.
  bool GemmBatched(bool trans_a, bool trans_b, int m, int n, int k, float alpha, TensorView a_v, int64_t stride_a,
                   TensorView b_v, int64_t stride_b, float beta, TensorView c_v, int64_t stride_c, int batch,
                   const float* bias) {
    if (m == 0 || n == 0 || batch == 0) return true;
    const bool low = bf16_ || a_v.dtype == DType::kBF16 || b_v.dtype == DType::kBF16;
    const Act c = A(c_v, "cuda Gemm");
    const size_t extra = static_cast<size_t>(batch - 1);
    const size_t a_count = extra * static_cast<size_t>(stride_a) + static_cast<size_t>(m) * k;
    const size_t b_count = extra * static_cast<size_t>(stride_b) + static_cast<size_t>(k) * n;
    const void* a = low ? Bf16Operand(a_v, a_count) : a_v.f32("cuda Gemm");
    const void* b = low ? Bf16Operand(b_v, b_count) : b_v.f32("cuda Gemm");
    if (a == nullptr || b == nullptr) return true;  // the error is recorded
    const size_t c_elem = c.bf16 ? 2 : 4, a_elem = low ? 2 : 4;
    Written(c.p, (extra * static_cast<size_t>(stride_c) + static_cast<size_t>(m) * n) * c_elem);
    // Operands sit at any element offset of a buffer (a chunk of rows): the plan is chosen
    // for their actual alignment (cuBLASLt otherwise assumes 256 bytes and may pick a
    // vectorised kernel that faults on a less aligned pointer); a batch's items are
    // aligned as the base and the stride both are.
    auto align = [&](const void* p, int64_t stride, size_t elem) {
      const uint32_t at = Alignment(p);
      if (batch == 1 || stride == 0) return at;
      return std::min(at, Alignment(reinterpret_cast<const void*>(static_cast<uintptr_t>(stride) * elem)));
    };
    const GemmKey key{trans_a, trans_b, m, n, k, align(b, stride_b, a_elem), align(a, stride_a, a_elem),
                      align(c.p, stride_c, c_elem), low, c.bf16, bias != nullptr ? Alignment(bias) : 0u,
                      batch, stride_a, stride_b, stride_c};
    GemmPlan* plan = Plan(key, bias);
    if (plan == nullptr) return bias == nullptr;  // no kernel for the bias epilogue: the caller's fallback
    if (bias != nullptr) {
      CUBLAS_CALL(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
    }
    CUBLAS_CALL(cublasLtMatmul(lt_, plan->desc, &alpha, b, plan->a, a, plan->b, &beta, c.p, plan->c, c.p, plan->c,
                               &plan->algo, gemm_workspace_, kGemmWorkspaceBytes, stream_));
    return true;
  }

  // The attention input (backend.h): the projections' bias is cuBLASLt's epilogue; in bf16
  // the q/k norms' output stays fp32 until RoPE has rotated it (one rounding, as the
  // contract's CPU reference rounds).
  //
  // bf16 without q/k norms, the weights (and biases) of q, k and v adjacent as the model's
  // slab lays them out: one GEMM into the packed P = x̃·[W_q; W_k; W_v]ᵀ (+ bias), then one
  // kernel for RoPE, the copy of v and V-scale (kernels/qkv.cu).
  void AttentionInputForward(const AttentionShape& s, TensorView xn, const AttentionInputWeights& w,
                             const AttentionInputActs& a) override {
    const int N = s.N(), qd = s.H * s.dh, kvd = s.KV * s.dh;
    const bool qk_norm = w.q_norm != nullptr;
    const bool all_bf16 = a.q.dtype == DType::kBF16 && a.k.dtype == DType::kBF16 && a.v.dtype == DType::kBF16 &&
                          a.vhat.dtype == DType::kBF16;  // the packed buffer rounds as they store
    if (PackedQkv(s, w) && all_bf16 && (w.bq == nullptr || (w.bk == w.bq + qd && w.bv == w.bk + kvd))) {
      const int width = qd + 2 * kvd;
      void* p = Scratch(&packed_buf_, static_cast<size_t>(N) * width * 2);
      const float2* cs = RopeTable(s.T, s.dh, *s.rope, 1.0);
      if (p == nullptr || cs == nullptr) return;
      // False only when cuBLASLt has no bias epilogue here (nothing done): unpacked below.
      if (GemmWithBias(false, true, N, width, s.d, 1.0f, xn, w.wq, 0.0f, TensorView(p, DType::kBF16, N, width, width),
                       w.bq)) {
        const char* op = "cuda AttentionInputForward";
        cuda::LaunchQkvSplit(stream_, A(a.q, op), A(a.k, op), A(a.v, op), A(a.vhat, op), Act(p, true), cs, w.theta,
                             s.B, s.T, s.H, s.KV, s.dh, s.vscale_c_base, s.vscale == VScaleMode::kVScale);
        LAUNCHED("QkvSplit (RoPE, V-scale)");
        return;
      }
    }
    const TensorView q_proj = qk_norm ? a.q_raw : a.q;
    const TensorView k_proj = qk_norm ? a.k_raw : a.k;
    Projection(N, qd, s.d, xn, w.wq, w.bq, q_proj);
    Projection(N, kvd, s.d, xn, w.wk, w.bk, k_proj);
    Projection(N, kvd, s.d, xn, w.wv, w.bv, a.v);
    if (qk_norm) {
      NormRope(a.q, a.rstd_q, a.q_raw, w.q_norm, s.B, s.T, s.H, s.dh, s.eps, *s.rope);
      NormRope(a.k, a.rstd_k, a.k_raw, w.k_norm, s.B, s.T, s.KV, s.dh, s.eps, *s.rope);
    } else {
      RopeForward(a.q, s.B, s.T, s.H, s.dh, *s.rope);
      RopeForward(a.k, s.B, s.T, s.KV, s.dh, *s.rope);
    }
    VScaleForward(a.vhat, a.v, w.theta, N, s.KV, s.dh, s.vscale_c_base, s.vscale);
  }

  // bf16: gate and up in one GEMM, a strided batch of two over the adjacent W_gate, W_up
  // into the adjacent gate and up buffers of the model's activations.
  void GateUpSwiGluForward(TensorView act, TensorView gate, TensorView up, TensorView x, const float* w_gate,
                           const float* w_up, int N, int F, int d) override {
    const size_t fd = static_cast<size_t>(F) * d, nf = static_cast<size_t>(N) * F;
    const size_t elem = DTypeBytes(gate.dtype);
    const auto gap = static_cast<char*>(up.data) - static_cast<char*>(gate.data);
    // up right after gate (at most the arena's alignment between them): one allocation,
    // nothing else inside the batch's extent.
    if (packed_ && w_up == w_gate + fd && gate.dtype == up.dtype && gap > 0 && gap % static_cast<ptrdiff_t>(elem) == 0 &&
        static_cast<size_t>(gap) / elem >= nf && static_cast<size_t>(gap) <= AlignUp(nf * elem)) {
      GemmBatched(false, true, N, F, d, 1.0f, x, 0, w_gate, static_cast<int64_t>(fd), 0.0f, gate,
                  static_cast<int64_t>(static_cast<size_t>(gap) / elem), 2, nullptr);
      SwiGluForward(act, gate, up, N, F);
      return;
    }
    Backend::GateUpSwiGluForward(act, gate, up, x, w_gate, w_up, N, F, d);
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
    cuda::LaunchRmsNormForward(stream_, nullptr, A(out_v, "cuda RmsNormForward"), rstd, A(x_v, "cuda RmsNormForward"),
                               nullptr, gamma, N, d, eps);
    LAUNCHED("RmsNormForward");
  }
  void ResidualRmsNormForward(float* sum, TensorView out_v, float* rstd, const float* x, const float* r, const float* gamma,
                              int N, int d, float eps) override {
    cuda::LaunchRmsNormForward(stream_, sum, A(out_v, "cuda ResidualRmsNormForward"), rstd, x, r, gamma, N, d, eps);
    LAUNCHED("ResidualRmsNormForward");
  }
  void RmsNormBackward(float* dx, float* dgamma, const float* dout, TensorView x_v, const float* gamma,
                       const float* rstd, int N, int d) override {
    float* partials = ColumnPartials(N, d);
    if (partials == nullptr) return;
    cuda::LaunchRmsNormBackward(stream_, dx, dgamma, dx, dout, A(x_v, "cuda RmsNormBackward"), gamma, rstd, N, d,
                                partials);
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
    const Act x = A(x_v, "cuda RopeForward");
    Rope(x, x, B, T, heads, dh, rope, 1.0);
  }
  void RopeBackward(float* dx, int B, int T, int heads, int dh, const RotaryFrequencies& rope) override {
    Rope(dx, dx, B, T, heads, dh, rope, -1.0);
  }

  // Flash attention (kernels/flash_attention.cu): the backward recomputes P from q, k and
  // the lse, so no workspace; its only scratch is D (B,H,T).
  size_t AttentionWorkspaceFloats(int, int, int) const override { return 0; }
  void AttentionForward(TensorView y_v, float* lse, float* /*workspace*/, TensorView q_v, TensorView k_v, TensorView v_v,
                        int B, int T, int H, int KV, int dh) override {
    const char* op = "cuda AttentionForward";
    const Act y = A(y_v, op), q = A(q_v, op), k = A(k_v, op), v = A(v_v, op);
#ifdef SINKSCOPE_CUDNN_ATTENTION
    if (y.bf16 && q.bf16 && k.bf16 && v.bf16) {
      if (const cuda::CudnnAttention* plan = CudnnPlan(B, T, H, KV, dh); plan != nullptr) {
        Status st;
        void* ws = Scratch(&cudnn_workspace_, plan->forward_workspace_bytes(), &st);
        if (st.ok()) {
          ++epoch_;
          st = plan->Forward(stream_, q.p, k.p, v.p, y.p, lse, ws);
        }
        if (st.ok()) return;
        RefuseCudnn(B, T, H, KV, dh, st);  // and run the tiled kernel below
      }
    }
#endif
    if (!HeadDimSupported(dh)) return;
    cuda::LaunchFlashAttentionForward(stream_, y, lse, q, k, v, B, T, H, KV, dh);
    LAUNCHED("AttentionForward");
  }
  void AttentionBackward(float* dq, float* dk, float* dv, const float* dy, TensorView y_v, const float* lse,
                         const float* /*workspace*/, TensorView q_v, TensorView k_v, TensorView v_v, int B, int T, int H,
                         int KV, int dh) override {
    const char* op = "cuda AttentionBackward";
    const Act y = A(y_v, op), q = A(q_v, op), k = A(k_v, op), v = A(v_v, op);
#ifdef SINKSCOPE_CUDNN_ATTENTION
    if (y.bf16 && q.bf16 && k.bf16 && v.bf16) {
      if (const cuda::CudnnAttention* plan = CudnnPlan(B, T, H, KV, dh); plan != nullptr) {
        const Status st = CudnnBackward(*plan, dq, dk, dv, dy, y, lse, q, k, v, B, T, H, KV, dh);
        if (st.ok()) return;
        // cuDNN's lse is the tiled kernel's: its backward can follow cuDNN's forward.
        RefuseCudnn(B, T, H, KV, dh, st);
      }
    }
#endif
    if (!HeadDimSupported(dh)) return;
    float* D = static_cast<float*>(Scratch(&scratch_, std::max<size_t>(static_cast<size_t>(B) * H * T, 1) * sizeof(float)));
    if (D == nullptr) return;
    cuda::LaunchFlashAttentionBackward(stream_, dq, dk, dv, D, dy, y, lse, q, k, v, B, T, H, KV, dh);
    LAUNCHED("AttentionBackward");
  }
  void AttentionColumnStats(float* alpha, float* mass, float* second_moment, float* per_sample_rate, TensorView q_v,
                            TensorView k_v, const float* lse, int B, int T, int H, int KV, int dh,
                            const ColumnStatsRequest& request) override {
    if (ColumnStats(alpha, mass, second_moment, per_sample_rate, A(q_v, "cuda AttentionColumnStats"),
                    A(k_v, "cuda AttentionColumnStats"), lse, nullptr, B, T, H, KV, dh, request, cuda::FlashArm{})) {
      LAUNCHED("AttentionColumnStats");
    }
  }
  // Column s of the attention matrix for the probes, recomputed from q, k and each row's
  // numbers (r0: the lse, or softpick's m; r1: softpick's D') by the arm's formula. False
  // when its scratch could not be had (the error is recorded).
  bool ColumnStats(float* alpha, float* mass, float* second_moment, float* per_sample_rate, Act q, Act k,
                   const float* r0, const float* r1, int B, int T, int H, int KV, int dh,
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
    const char* op = "cuda ArmAttentionForward";
    const Act y = A(y_v, op), q = A(q_v, op), k = A(k_v, op), v = A(v_v, op);
    if (!HeadDimSupported(dh)) return;
    const size_t rows = static_cast<size_t>(B) * H * T;
    cuda::LaunchFlashArmForward(stream_, y, ws, ws + rows, unassigned, q, k, v, B, T, H, KV, dh, DeviceArm(arm, sink));
    LAUNCHED("ArmAttentionForward");
  }
  void ArmAttentionBackward(float* dq, float* dk, float* dv, float* dsink, const float* dy, TensorView y_v,
                            const float* /*att*/, const float* unassigned, const float* ws, TensorView q_v,
                            TensorView k_v, TensorView v_v, const float* sink, int B, int T, int H, int KV, int dh,
                            const AttentionArmParams& arm) override {
    const char* op = "cuda ArmAttentionBackward";
    const Act y = A(y_v, op), q = A(q_v, op), k = A(k_v, op), v = A(v_v, op);
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
    if (ColumnStats(alpha, mass, second_moment, per_sample_rate, A(q_v, "cuda ArmAttentionColumnStats"),
                    A(k_v, "cuda ArmAttentionColumnStats"), ws, ws + rows, B, T, H, KV, dh, request,
                    DeviceArm(arm, nullptr))) {
      LAUNCHED("ArmAttentionColumnStats");
    }
  }
  void SigmoidGateForward(TensorView out_v, TensorView x_v, const float* logits, int N, int G, int C) override {
    cuda::LaunchSigmoidGateForward(stream_, A(out_v, "cuda SigmoidGateForward"), A(x_v, "cuda SigmoidGateForward"),
                                   logits, N, G, C);
    LAUNCHED("SigmoidGateForward");
  }
  void SigmoidGateBackward(float* dx, float* dlogits, const float* dout, TensorView x_v, const float* logits, int N,
                           int G, int C) override {
    cuda::LaunchSigmoidGateBackward(stream_, dx, dlogits, dout, A(x_v, "cuda SigmoidGateBackward"), logits, N, G, C);
    LAUNCHED("SigmoidGateBackward");
  }

  void VScaleForward(TensorView vhat_v, TensorView v_v, const float* theta, int N, int KV, int dh, double c_base,
                     VScaleMode mode) override {
    const Act vhat = A(vhat_v, "cuda VScaleForward"), v = A(v_v, "cuda VScaleForward");
    if (mode != VScaleMode::kVScale) {
      cuda::LaunchConvert(stream_, vhat, v, static_cast<size_t>(N) * KV * dh);
      LAUNCHED("VScaleForward (copy)");
      return;
    }
    cuda::LaunchVScaleForward(stream_, vhat, v, theta, N, KV, dh, c_base);
    LAUNCHED("VScaleForward");
  }
  void VScaleBackward(float* dv, float* dtheta, const float* dvhat, TensorView v_v, const float* theta, int N, int KV,
                      int dh, double c_base, VScaleMode mode) override {
    const Act v = A(v_v, "cuda VScaleBackward");
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
    const char* op = "cuda SwiGluForward";
    cuda::LaunchSwiGluForward(stream_, A(h_v, op), A(gate_v, op), A(up_v, op), static_cast<size_t>(N) * F);
    LAUNCHED("SwiGluForward");
  }
  void SwiGluBackward(float* dgate, float* dup, const float* dh, TensorView gate_v, TensorView up_v, int N,
                      int F) override {
    const char* op = "cuda SwiGluBackward";
    const size_t n = static_cast<size_t>(N) * F;
    cuda::LaunchSwiGluBackward(stream_, dgate, dup, dh, A(gate_v, op), A(up_v, op), n, n, n);
    LAUNCHED("SwiGluBackward");
  }

  void CrossEntropyForwardBackward(float* logits, const int32_t* targets, int N, int V, float grad_scale,
                                   double* loss_acc) override {
    double* rows = static_cast<double*>(Scratch(&dscratch_, std::max(N, 1) * sizeof(double)));
    if (rows == nullptr) return;
    cuda::LaunchCrossEntropy(stream_, logits, targets, N, V, true, grad_scale, rows, loss_acc);
    LAUNCHED("CrossEntropyForwardBackward");
  }
  // bf16 (without q/k norms or biases, which read the fp32 gradients): RoPE's backward
  // writes ∂L/∂q and ∂L/∂k in bf16, the operands of the GEMMs that read them (the CPU
  // reference rounds them as those operands); dq and dk are left as they came.
  void AttentionInputBackward(const AttentionShape& s, float* dxn, float* dq, float* dk, const float* dv, TensorView xn,
                              const AttentionInputWeights& w, const AttentionInputActs& a, const AttentionInputGrads& g,
                              float* scratch_q, float* scratch_k) override {
    if (!bf16_ || w.q_norm != nullptr || w.bq != nullptr) {
      Backend::AttentionInputBackward(s, dxn, dq, dk, dv, xn, w, a, g, scratch_q, scratch_k);
      return;
    }
    const int N = s.N(), qd = s.H * s.dh, kvd = s.KV * s.dh;
    const size_t qd_d = static_cast<size_t>(qd) * s.d, kvd_d = static_cast<size_t>(kvd) * s.d;
    if (PackedQkv(s, w) && (g.wq == nullptr || (g.wk == g.wq + qd_d && g.wv == g.wk + kvd_d))) {
      // One operand [RoPE⁻¹(∂q) | RoPE⁻¹(∂k) | ∂v] (N, qd + 2·kvd) in bf16: ∂x̃ and the
      // three weight gradients are then one GEMM each.
      const int width = qd + 2 * kvd;
      void* p = Scratch(&packed_buf_, static_cast<size_t>(N) * width * 2);
      const float2* cs = RopeTable(s.T, s.dh, *s.rope, -1.0);
      if (p == nullptr || cs == nullptr) return;
      cuda::LaunchQkvPackGrad(stream_, Act(p, true), dq, dk, dv, cs, s.B, s.T, s.H, s.KV, s.dh);
      LAUNCHED("QkvPackGrad (RoPE backward)");
      const TensorView dp(p, DType::kBF16, N, width, width);
      Gemm(false, false, N, s.d, width, 1.0f, dp, w.wq, 0.0f, dxn);
      if (g.wq != nullptr) Gemm(true, false, width, s.d, N, 1.0f, dp, xn, 1.0f, g.wq);
      return;
    }
    const size_t q_bytes = AlignUp(static_cast<size_t>(N) * qd * 2);
    char* buf = static_cast<char*>(Scratch(&rope_grads_, std::max<size_t>(q_bytes + static_cast<size_t>(N) * kvd * 2, 1)));
    if (buf == nullptr) return;
    Rope(Act(buf, true), Act(dq), s.B, s.T, s.H, s.dh, *s.rope, -1.0);
    Rope(Act(buf + q_bytes, true), Act(dk), s.B, s.T, s.KV, s.dh, *s.rope, -1.0);
    const TensorView dq16(buf, DType::kBF16, N, qd, qd), dk16(buf + q_bytes, DType::kBF16, N, kvd, kvd);
    AttentionInputBackwardGemms(s, dxn, dq16, dk16, dv, xn, w, g);
  }

  // bf16: SwiGLU's backward writes ∂L/∂gate and ∂L/∂up in bf16, the operands of the four
  // GEMMs that read them (the CPU reference rounds them as those operands): no fp32 copy
  // and no conversion. d_gate and d_up (the model's fp32 scratch) are not used.
  void GateUpSwiGluBackward(float* dx, float* dw_gate, float* dw_up, float* d_gate, float* d_up, const float* d_act,
                            TensorView gate, TensorView up, TensorView x, const float* w_gate, const float* w_up, int N,
                            int F, int d) override {
    if (!bf16_) {
      Backend::GateUpSwiGluBackward(dx, dw_gate, dw_up, d_gate, d_up, d_act, gate, up, x, w_gate, w_up, N, F, d);
      return;
    }
    const size_t n = static_cast<size_t>(N) * F, half = AlignUp(n * 2), fd = static_cast<size_t>(F) * d;
    char* buf = static_cast<char*>(Scratch(&swiglu_grads_, std::max<size_t>(2 * half, 1)));
    if (buf == nullptr) return;
    const char* op = "cuda GateUpSwiGluBackward";
    if (packed_ && w_up == w_gate + fd && (dw_gate == nullptr || dw_up == dw_gate + fd)) {
      // Packed rows [∂gate | ∂up] (N, 2F): ∂x and both weight gradients one GEMM each over
      // the adjacent W_gate, W_up.
      cuda::LaunchSwiGluBackward(stream_, Act(buf, true), Act(buf + static_cast<size_t>(F) * 2, true), d_act,
                                 A(gate, op), A(up, op), n, F, 2 * static_cast<size_t>(F));
      LAUNCHED("SwiGluBackward (packed bf16 gradients)");
      const TensorView dgu(buf, DType::kBF16, N, 2 * F, 2 * F);
      Gemm(false, false, N, d, 2 * F, 1.0f, dgu, w_gate, 0.0f, dx);
      if (dw_gate != nullptr) Gemm(true, false, 2 * F, d, N, 1.0f, dgu, x, 1.0f, dw_gate);
      return;
    }
    cuda::LaunchSwiGluBackward(stream_, Act(buf, true), Act(buf + half, true), d_act, A(gate, op), A(up, op), n, n, n);
    LAUNCHED("SwiGluBackward (bf16 gradients)");
    const TensorView dg(buf, DType::kBF16, N, F, F), du(buf + half, DType::kBF16, N, F, F);
    GateUpBackwardGemms(dx, dw_gate, dw_up, dg, du, x, w_gate, w_up, N, F, d);
  }

  // bf16: the LM head's cross-entropy writes ∂L/∂logits straight into a bf16 buffer, the
  // operand of both GEMMs that read it (the CPU reference rounds it as their operand).
  void LmHeadCrossEntropy(float* dx, float* dw, float* logits, int logits_rows, TensorView x, const float* w,
                          const int32_t* targets, int N, int V, int d, float grad_scale, double* loss_acc) override {
    if (!bf16_) {
      Backend::LmHeadCrossEntropy(dx, dw, logits, logits_rows, x, w, targets, N, V, d, grad_scale, loss_acc);
      return;
    }
    void* dlogits = Scratch(&dlogits_, std::max<size_t>(static_cast<size_t>(logits_rows) * V, 1) * 2);
    double* rows = static_cast<double*>(Scratch(&dscratch_, std::max(logits_rows, 1) * sizeof(double)));
    if (dlogits == nullptr || rows == nullptr) return;
    for (int r0 = 0; r0 < N; r0 += logits_rows) {
      const int R = std::min(logits_rows, N - r0);
      const TensorView xr = x.From(static_cast<size_t>(r0) * d);
      const TensorView dl(dlogits, DType::kBF16, R, V, V);
      Gemm(false, true, R, V, d, 1.0f, xr, w, 0.0f, logits);  // (R,V) fp32
      cuda::LaunchCrossEntropy(stream_, logits, targets + r0, R, V, true, grad_scale, rows, loss_acc,
                               Act(dlogits, true));
      LAUNCHED("LmHeadCrossEntropy");
      Gemm(false, false, R, d, V, 1.0f, dl, w, 0.0f, dx + static_cast<size_t>(r0) * d);
      if (dw != nullptr) Gemm(true, false, V, d, R, 1.0f, dl, xr, 1.0f, dw);
    }
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
    Written(p, n * sizeof(float));
    const AdamWSegment seg = AdamWSegmentOf(p, m, v, g, n, weight_decay, nullptr);
    const auto* table = static_cast<const AdamWSegment*>(DeviceTable(&seg, sizeof seg));
    if (table == nullptr) return;
    const auto [bc1, bc2] = BiasCorrections(beta1, beta2, step);
    cuda::LaunchAdamW(stream_, table, 1, n, n, nullptr, 0, grad_scale, lr, beta1, beta2, eps, bc1, bc2);
    LAUNCHED("AdamW");
  }
  // One launch; the guard is read on the device (no host synchronisation). In bf16 mode
  // the kernel also writes each parameter's bf16 copy, the operand every GEMM reads.
  void MultiTensorAdamW(const std::vector<AdamWTensor>& tensors, const AdamWHyper& h, const double* guard) override {
    std::vector<AdamWSegment> segs;
    size_t max_n = 0, total_n = 0, bf16_n = 0;
    for (const AdamWTensor& t : tensors) {
      if (t.n == 0) continue;
      void* copy = bf16_ ? ShadowOf(t.p, t.n) : nullptr;
      segs.push_back(AdamWSegmentOf(t.p, t.m, t.v, t.g, t.n, t.weight_decay, copy));
      max_n = std::max(max_n, t.n);
      total_n += t.n;
      if (copy != nullptr) bf16_n += t.n;
    }
    if (segs.empty()) return;
    const auto* table = static_cast<const AdamWSegment*>(DeviceTable(segs.data(), segs.size() * sizeof(AdamWSegment)));
    if (table == nullptr) return;
    const auto [bc1, bc2] = BiasCorrections(h.beta1, h.beta2, h.step);
    cuda::LaunchAdamW(stream_, table, static_cast<int>(segs.size()), max_n, total_n, guard, h.grad_clip, 1.0f, h.lr, h.beta1,
                      h.beta2, h.eps, bc1, bc2, bf16_n);
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
  // What a GEMM plan depends on. align_*: of cuBLASLt's A (our B), B (our A), C = D (our
  // C) and the bias, in bytes; low: bf16 operands; c_bf16: a bf16 C.
  struct GemmKey {
    bool ta, tb;
    int m, n, k;
    uint32_t align_a, align_b, align_c;
    bool low, c_bf16;
    uint32_t align_bias;  // 0: no bias epilogue
    int batch;            // a strided batch of products (1: one), with our A, B, C strides
    int64_t stride_a, stride_b, stride_c;
    auto Tie() const {
      return std::tie(ta, tb, m, n, k, align_a, align_b, align_c, low, c_bf16, align_bias, batch, stride_a, stride_b,
                      stride_c);
    }
    bool operator<(const GemmKey& o) const { return Tie() < o.Tie(); }
  };
  // A parameter's bf16 copy (bf16 mode): n elements from the fp32 tensor's start; stale
  // after a write to the fp32 tensor other than the AdamW kernel's, refreshed when read.
  // The copies of the parameters of one allocation (the model's slab) live in one bf16
  // mirror of it, at the same element offsets: adjacent parameters (W_q, W_k, W_v; W_gate,
  // W_up) have adjacent copies, so a packed GEMM reads them as one matrix. A copy outside
  // any known allocation has its own buffer (owned).
  struct Shadow {
    size_t n = 0;
    void* bf16 = nullptr;
    bool fresh = false;
    bool owned = false;
  };

  // A view as a kernel operand: fp32 or bf16 (any other dtype aborts, naming `where`).
  static Act A(TensorView v, const char* where) {
    if (!v) return Act();
    if (v.dtype == DType::kBF16) return Act(v.data, true);
    return Act(v.f32(where));
  }

  // The bf16 operand of a bf16 GEMM for a view of `count` elements: a bf16 view as it is,
  // a parameter's bf16 copy, or any other fp32 buffer converted, once while it is unchanged
  // (converted_). Null when memory ran out (recorded).
  const void* Bf16Operand(TensorView v, size_t count) {
    if (v.dtype == DType::kBF16) return v.data;
    const float* x = v.f32("cuda Gemm");
    if (const void* copy = ShadowRead(x, count); copy != nullptr) return copy;
    Converted* slot = &converted_[0];
    for (Converted& c : converted_) {
      if (c.x == x && c.count >= count && c.epoch == epoch_) {
        c.used = ++use_clock_;
        return c.buf.p;
      }
      if (c.used < slot->used) slot = &c;  // the least recently used
    }
    void* out = Scratch(&slot->buf, std::max<size_t>(count, 1) * 2);
    if (out == nullptr) {
      *slot = Converted{};  // its buffer is gone
      return nullptr;
    }
    cuda::LaunchConvert(stream_, Act(out, true), Act(x), count);
    Record(cudaGetLastError(), "kernel launch of Gemm operand to bf16", __LINE__);  // no epoch: it writes only its slot
    *slot = Converted{x, count, epoch_, slot->buf, ++use_clock_};
    return out;
  }

  // The copy of [x, x + count), refreshed where stale, or null: within one parameter, or
  // across parameters that follow each other without a gap in one mirror.
  const void* ShadowRead(const float* x, size_t count) {
    if (shadows_.empty()) return nullptr;
    auto it = shadows_.upper_bound(reinterpret_cast<uintptr_t>(x));
    if (it == shadows_.begin()) return nullptr;
    --it;
    const uintptr_t start = it->first;
    const size_t offset = (reinterpret_cast<uintptr_t>(x) - start) / sizeof(float);
    if (offset >= it->second.n) return nullptr;
    const char* copy = static_cast<const char*>(it->second.bf16) + offset * 2;
    size_t covered = it->second.n - offset;  // elements from x that the copies hold so far
    Refresh(reinterpret_cast<const float*>(start), &it->second);
    while (covered < count) {
      const Shadow& prev = it->second;
      const uintptr_t end = it->first + prev.n * sizeof(float);
      ++it;
      if (it == shadows_.end() || it->first != end || prev.owned || it->second.owned ||
          static_cast<const char*>(it->second.bf16) != static_cast<const char*>(prev.bf16) + prev.n * 2) {
        return nullptr;
      }
      Refresh(reinterpret_cast<const float*>(it->first), &it->second);
      covered += it->second.n;
    }
    return copy;
  }
  // The copy of parameter p made equal to it again if stale.
  void Refresh(const float* p, Shadow* sh) {
    if (sh->fresh) return;
    cuda::LaunchConvert(stream_, Act(sh->bf16, true), Act(p), sh->n);
    LAUNCHED("parameter to bf16");
    sh->fresh = true;
  }
  // The bf16 copy of parameter p(n) for the AdamW kernel to write (made and filled on first
  // use, so it is right even when the guard skips the update), or null without memory.
  void* ShadowOf(float* p, size_t n) {
    const uintptr_t key = reinterpret_cast<uintptr_t>(p);
    auto it = shadows_.find(key);
    if (it != shadows_.end() && it->second.n != n) {
      DropShadows(p, n * sizeof(float));
      it = shadows_.end();
    }
    if (it == shadows_.end()) {
      Shadow sh;
      sh.n = n;
      sh.bf16 = MirrorOf(p, n);
      if (sh.bf16 == nullptr) {
        sh.owned = true;
        if (cudaMalloc(&sh.bf16, n * 2) != cudaSuccess) {
          cudaGetLastError();  // no room for the copy: this tensor's GEMMs convert it instead
          return nullptr;
        }
      }
      it = shadows_.emplace(key, sh).first;
    }
    Refresh(p, &it->second);
    return it->second.bf16;
  }
  // Where p(n)'s copy goes in the bf16 mirror of the allocation holding it (made on first
  // use), or null: p is in no allocation of this backend, or there is no room.
  void* MirrorOf(const float* p, size_t n) {
    auto a = alloc_bytes_.upper_bound(p);
    if (a == alloc_bytes_.begin()) return nullptr;
    --a;
    const auto* base = static_cast<const char*>(a->first);
    const auto* at = reinterpret_cast<const char*>(p);
    if (at + n * sizeof(float) > base + a->second) return nullptr;
    auto m = mirrors_.find(a->first);
    if (m == mirrors_.end()) {
      void* mirror = nullptr;
      if (cudaMalloc(&mirror, std::max<size_t>(a->second / 2, 2)) != cudaSuccess) {
        cudaGetLastError();
        return nullptr;
      }
      m = mirrors_.emplace(a->first, mirror).first;
    }
    return static_cast<char*>(m->second) + (at - base) / 2;
  }
  // A write of `bytes` at p by anything but the AdamW kernel: the copies it overlaps are
  // stale, and so are the converted operands it overlaps.
  void Written(const void* p, size_t bytes) {
    if (bytes == 0) return;
    const uintptr_t lo = reinterpret_cast<uintptr_t>(p), hi = lo + bytes;
    for (Converted& c : converted_) {
      const uintptr_t c_lo = reinterpret_cast<uintptr_t>(c.x);
      if (c.x != nullptr && c_lo < hi && c_lo + c.count * sizeof(float) > lo) c.x = nullptr;
    }
    if (shadows_.empty()) return;
    auto it = shadows_.upper_bound(lo);
    if (it != shadows_.begin()) --it;
    for (; it != shadows_.end() && it->first < hi; ++it) {
      if (it->first + it->second.n * sizeof(float) > lo) it->second.fresh = false;
    }
  }
  // Frees the copies of the parameters that start in [p, p + bytes).
  void DropShadows(const void* p, size_t bytes) {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(p);
    auto first = shadows_.lower_bound(lo), last = shadows_.lower_bound(lo + bytes);
    if (first == last) return;
    CUDA_CALL(cudaStreamSynchronize(stream_));  // queued GEMMs may still read them
    for (auto it = first; it != last; ++it) {
      if (it->second.owned) cudaFree(it->second.bf16);
    }
    shadows_.erase(first, last);
  }

  // Whether the bf16 step projects q, k and v in one GEMM: no q/k norms (their fp32
  // output is rounded after RoPE), and W_q, W_k, W_v adjacent in one allocation, as the
  // model's slab lays them out whenever qd·d and kvd·d are multiples of its alignment.
  bool PackedQkv(const AttentionShape& s, const AttentionInputWeights& w) const {
    const size_t qd_d = static_cast<size_t>(s.H) * s.dh * s.d, kvd_d = static_cast<size_t>(s.KV) * s.dh * s.d;
    return packed_ && w.q_norm == nullptr && w.wk == w.wq + qd_d && w.wv == w.wk + kvd_d && s.dh % 2 == 0;
  }

  // One projection x(N,d)·Wᵀ (+ bias) → out(N,n). bf16: the bias in the GEMM's epilogue,
  // or (without such a kernel) added to an fp32 result before it is stored: one rounding.
  // The fp32 mode keeps the composition (GEMM, then the bias kernel): bit for bit what
  // the unfused ops give, as the parity mode promises.
  void Projection(int N, int n, int d, TensorView x, const float* w, const float* bias, TensorView out) {
    if (bias == nullptr || !bf16_) {
      Gemm(false, true, N, n, d, 1.0f, x, w, 0.0f, out);
      if (bias != nullptr) AddRowBias(out, bias, N, n);
      return;
    }
    if (GemmWithBias(false, true, N, n, d, 1.0f, x, w, 0.0f, out, bias)) return;
    const Act o = A(out, "cuda AttentionInputForward");
    float* tmp = o.bf16 ? static_cast<float*>(Scratch(&qk_scratch_, static_cast<size_t>(N) * n * sizeof(float)))
                        : static_cast<float*>(o.p);
    if (tmp == nullptr) return;
    Gemm(false, true, N, n, d, 1.0f, x, w, 0.0f, tmp);
    cuda::LaunchAddRowBias(stream_, tmp, bias, N, n);
    LAUNCHED("AddRowBias");
    if (o.bf16) {
      cuda::LaunchConvert(stream_, o, tmp, static_cast<size_t>(N) * n);
      LAUNCHED("projection to bf16");
    }
  }
  // out = RoPE(RMSNorm(x)·γ) per head (rows N·heads of dh), rounded once when out is bf16.
  void NormRope(TensorView out_v, float* rstd, TensorView x_v, const float* gamma, int B, int T, int heads, int dh,
                float eps, const RotaryFrequencies& rope) {
    const int rows = B * T * heads;
    const Act out = A(out_v, "cuda AttentionInputForward"), x = A(x_v, "cuda AttentionInputForward");
    Act normed = out;
    if (out.bf16) {
      normed = static_cast<float*>(Scratch(&qk_scratch_, static_cast<size_t>(rows) * dh * sizeof(float)));
      if (normed.p == nullptr) return;
    }
    cuda::LaunchRmsNormForward(stream_, nullptr, normed, rstd, x, nullptr, gamma, rows, dh, eps);
    LAUNCHED("RmsNormForward (q/k norm)");
    Rope(out, normed, B, T, heads, dh, rope, 1.0);
  }

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
    ++epoch_;  // fresh memory, maybe where a converted operand's source was
    if (!CUDA_CALL(cudaMemsetAsync(p, 0, bytes, stream_))) {
      cudaFree(p);
      return nullptr;
    }
    if (bf16_) alloc_bytes_[p] = bytes;
    return p;
  }

  void RecordStatus(const Status& st) {
    if (st.ok()) return;
    std::lock_guard<std::mutex> lock(error_mu_);
    if (error_.ok()) error_ = st;
  }

#ifdef SINKSCOPE_CUDNN_ATTENTION
  // The cuDNN plans of the causal GQA attention of this shape (q, k, v, y each a packed
  // bf16 (B,T,heads,dh) view; lse (B,H,T) as the backend's), or null where cuDNN cannot
  // take it (the layout's rules, no engine, no plan): the tiled kernel then runs, and the
  // reason is printed once per shape. The backward is cuDNN's deterministic one (dQ in its
  // own pass, no atomics), as the backend promises the same bits on every run.
  const cuda::CudnnAttention* CudnnPlan(int B, int T, int H, int KV, int dh) {
    if (cudnn_cache_ == nullptr) return nullptr;
    const auto key = std::make_tuple(B, T, H, KV, dh);
    if (cudnn_refused_.count(key) != 0) return nullptr;
    const cuda::AttentionLayout layout = cuda::AttentionLayout::Separate(B, T, H, KV, dh, /*deterministic=*/true);
    Status st = cuda::Validate(layout, cuda::AttentionPass::kBackward);
    StatusOr<std::shared_ptr<const cuda::CudnnAttention>> plan = st;
    if (st.ok()) plan = cudnn_cache_->Get(layout);
    if (!plan.ok()) {
      cudnn_refused_.insert(key);
      std::fprintf(stderr, "sinkscope: cuDNN attention refused %s (%s): the tiled kernel runs it\n",
                   layout.ToString().c_str(), plan.status().message().c_str());
      return nullptr;
    }
    if (cudnn_used_.insert(key).second) {
      std::fprintf(stderr, "sinkscope: attention %s through cuDNN (engines %lld forward, %lld backward)\n",
                   layout.ToString().c_str(), static_cast<long long>((*plan)->forward_engine()),
                   static_cast<long long>((*plan)->backward_engine()));
    }
    return plan->get();  // the cache keeps it
  }
  // A shape cuDNN failed on (memory, or an execution it refused): the tiled kernel runs it
  // from now on, said once.
  void RefuseCudnn(int B, int T, int H, int KV, int dh, const Status& why) {
    cudnn_refused_.insert(std::make_tuple(B, T, H, KV, dh));
    std::fprintf(stderr, "sinkscope: cuDNN attention failed for B%d T%d H%d KV%d dh%d (%s): the tiled kernel runs it\n",
                 B, T, H, KV, dh, why.message().c_str());
  }
  // cuDNN's backward takes and gives bf16; the backend's dy is fp32 and its dq, dk, dv are
  // written in fp32: dO is rounded on the way in, the gradients widened on the way out.
  // Not OK (nothing written to dq, dk, dv) when its memory could not be had or cuDNN
  // refused the call: the caller runs the tiled kernel.
  Status CudnnBackward(const cuda::CudnnAttention& plan, float* dq, float* dk, float* dv, const float* dy, Act y,
                       const float* lse, Act q, Act k, Act v, int B, int T, int H, int KV, int dh) {
    const size_t nq = static_cast<size_t>(B) * T * H * dh, nkv = static_cast<size_t>(B) * T * KV * dh;
    const size_t q_bytes = AlignUp(nq * 2), kv_bytes = AlignUp(nkv * 2);
    Status st;
    char* g = static_cast<char*>(Scratch(&cudnn_grads_, 2 * q_bytes + 2 * kv_bytes, &st));
    float* scratch =
        static_cast<float*>(Scratch(&cudnn_scratch_, std::max<size_t>(plan.backward_scratch_floats(), 1) * 4, &st));
    void* ws = Scratch(&cudnn_workspace_, plan.backward_workspace_bytes(), &st);
    if (!st.ok()) return st;
    void *d_o = g, *dq16 = g + q_bytes, *dk16 = g + 2 * q_bytes, *dv16 = g + 2 * q_bytes + kv_bytes;
    cuda::LaunchConvert(stream_, Act(d_o, true), Act(dy), nq);
    LAUNCHED("AttentionBackward (dO to bf16)");
    ++epoch_;
    RETURN_IF_ERROR(plan.Backward(stream_, q.p, k.p, v.p, y.p, d_o, lse, dq16, dk16, dv16, ws, scratch));
    cuda::LaunchConvert(stream_, Act(dq), Act(dq16, true), nq);
    cuda::LaunchConvert(stream_, Act(dk), Act(dk16, true), nkv);
    cuda::LaunchConvert(stream_, Act(dv), Act(dv16, true), nkv);
    LAUNCHED("AttentionBackward (gradients to fp32)");
    return OkStatus();
  }
#endif

  // The first pass's partials of a two-pass column sum over (N, n).
  float* ColumnPartials(int N, int n) {
    return static_cast<float*>(Scratch(&column_scratch_, std::max<size_t>(cuda::ColumnPartialsFloats(N, n), 1) * sizeof(float)));
  }

  // A device buffer of at least `bytes`, grown when needed (the stream is drained first:
  // queued kernels may still read the old one).
  // With `no_memory`, running out of memory is an answer, not a device error: *no_memory
  // says so (the cuDNN path, whose caller runs the tiled kernel instead).
  void* Scratch(Buffer* buf, size_t bytes, Status* no_memory = nullptr) {
    if (buf->bytes >= bytes) return buf->p;
    CUDA_CALL(cudaStreamSynchronize(stream_));
    if (buf->p != nullptr) cudaFree(buf->p);
    buf->p = nullptr;
    buf->bytes = 0;
    if (no_memory != nullptr) {
      if (cudaMalloc(&buf->p, bytes) != cudaSuccess) {
        cudaGetLastError();
        buf->p = nullptr;
        *no_memory = Status(StatusCode::kResourceExhausted, std::to_string(bytes) + " bytes of device memory");
        return nullptr;
      }
    } else if (!CUDA_CALL(cudaMalloc(&buf->p, bytes))) {
      return nullptr;
    }
    buf->bytes = bytes;
    return buf->p;
  }
  static size_t AlignUp(size_t bytes) { return (bytes + Arena::kAlign - 1) / Arena::kAlign * Arena::kAlign; }

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
  static AdamWSegment AdamWSegmentOf(float* p, float* m, float* v, const float* g, size_t n, float weight_decay,
                                     void* p_bf16) {
    AdamWSegment s;
    std::memset(&s, 0, sizeof s);
    s.p = p;
    s.m = m;
    s.v = v;
    s.g = g;
    s.n = n;
    s.weight_decay = weight_decay;
    s.p_bf16 = p_bf16;
    return s;
  }

  static std::pair<double, double> BiasCorrections(float beta1, float beta2, int64_t step) {
    return {1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step)),
            1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step))};
  }

  // (cos, sin) per (t, j), computed in double exactly as the CPU backend, cached by
  // everything they depend on.
  void Rope(Act dst, Act src, int B, int T, int heads, int dh, const RotaryFrequencies& rope, double sign) {
    const float2* cs = RopeTable(T, dh, rope, sign);
    if (cs == nullptr) return;
    cuda::LaunchRope(stream_, dst, src, cs, B, T, heads, dh);
    LAUNCHED("Rope");
  }
  // The (T, dh/2) table of `sign`; null when it could not be made (recorded).
  const float2* RopeTable(int T, int dh, const RotaryFrequencies& rope, double sign) {
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
      if (!CUDA_CALL(cudaMalloc(&p, cs.size() * sizeof(float)))) return nullptr;
      if (!CUDA_CALL(cudaMemcpyAsync(p, cs.data(), cs.size() * sizeof(float), cudaMemcpyHostToDevice, stream_))) {
        cudaFree(p);
        return nullptr;
      }
      it = rope_tables_.emplace(std::move(key), p).first;
    }
    return static_cast<const float2*>(it->second);
  }

  // The largest power of two ≤ 256 dividing the address (at least 2: a bf16 element).
  static uint32_t Alignment(const void* p) {
    const auto bits = reinterpret_cast<uintptr_t>(p);
    uint32_t a = 256;
    while (a > 2 && bits % a != 0) a /= 2;
    return a;
  }

  // The plan of one GEMM shape (cached): fp32, or bf16 operands with fp32 compute and an
  // fp32 or bf16 C; with the bias epilogue when `bias` is given (its pointer is set per
  // call). Null when cuBLASLt has no algorithm; that is recorded unless a bias was asked
  // for (the caller then adds the bias itself).
  GemmPlan* Plan(const GemmKey& key, const float* bias) {
    auto it = gemm_plans_.find(key);
    if (it != gemm_plans_.end()) return &it->second;
    if (no_bias_plans_.count(key) != 0) return nullptr;
    const bool ta = key.ta, tb = key.tb;
    const int m = key.m, n = key.n, k = key.k;
    GemmPlan plan;
    const cudaDataType_t ab = key.low ? CUDA_R_16BF : CUDA_R_32F, ct = key.c_bf16 ? CUDA_R_16BF : CUDA_R_32F;
    const cublasOperation_t op_a = tb ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLASLt's A is our B
    const cublasOperation_t op_b = ta ? CUBLAS_OP_T : CUBLAS_OP_N;  // and its B our A
    bool ok = CUBLAS_CALL(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F)) &&
              CUBLAS_CALL(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof op_a)) &&
              CUBLAS_CALL(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof op_b)) &&
              // Our B, row-major (k,n) [or (n,k) when transposed], is column-major (n,k) [(k,n)].
              CUBLAS_CALL(cublasLtMatrixLayoutCreate(&plan.a, ab, tb ? k : n, tb ? n : k, tb ? k : n)) &&
              CUBLAS_CALL(cublasLtMatrixLayoutCreate(&plan.b, ab, ta ? m : k, ta ? k : m, ta ? m : k)) &&
              CUBLAS_CALL(cublasLtMatrixLayoutCreate(&plan.c, ct, n, m, n));
    if (ok && key.batch > 1) {
      const int32_t count = key.batch;
      for (const auto& [layout, stride] : {std::pair{plan.a, key.stride_b}, {plan.b, key.stride_a}, {plan.c, key.stride_c}}) {
        ok = ok &&
             CUBLAS_CALL(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof count)) &&
             CUBLAS_CALL(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                                          sizeof stride));
      }
    }
    if (ok && bias != nullptr) {
      // Whatever cuBLASLt says about the bias epilogue (an fp32 bias beside a bf16 D) is an
      // answer, not a device error: the caller adds the bias itself.
      const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
      const cudaDataType_t bias_type = CUDA_R_32F;
      const bool set =
          cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof epilogue) ==
              CUBLAS_STATUS_SUCCESS &&
          cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                         sizeof bias_type) == CUBLAS_STATUS_SUCCESS &&
          cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias) ==
              CUBLAS_STATUS_SUCCESS;
      if (!set) {
        plan.Destroy();
        no_bias_plans_.insert(key);
        return nullptr;
      }
    }
    cublasLtMatmulPreference_t pref = nullptr;
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    ok = ok && CUBLAS_CALL(cublasLtMatmulPreferenceCreate(&pref)) &&
         CUBLAS_CALL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                          &kGemmWorkspaceBytes, sizeof kGemmWorkspaceBytes)) &&
         CUBLAS_CALL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                          &key.align_a, sizeof key.align_a)) &&
         CUBLAS_CALL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                          &key.align_b, sizeof key.align_b)) &&
         CUBLAS_CALL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                          &key.align_c, sizeof key.align_c)) &&
         CUBLAS_CALL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                          &key.align_c, sizeof key.align_c));
    if (ok) {
      const cublasStatus_t e = cublasLtMatmulAlgoGetHeuristic(lt_, plan.desc, plan.a, plan.b, plan.c, plan.c, pref, 1,
                                                              &result, &found);
      if (bias != nullptr && (e != CUBLAS_STATUS_SUCCESS || found == 0)) {
        cublasLtMatmulPreferenceDestroy(pref);
        plan.Destroy();
        no_bias_plans_.insert(key);  // the caller adds the bias itself, each time
        return nullptr;
      }
      ok = RecordBlas(e, "cublasLtMatmulAlgoGetHeuristic", __LINE__);
    }
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
  const bool bf16_;
  cudaStream_t stream_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  void* gemm_workspace_ = nullptr;
  double* partials_ = nullptr;
  Buffer scratch_, dscratch_, column_scratch_, massive_scratch_;
  // bf16 GEMM operands converted from fp32 buffers, reused by the GEMMs that read the same
  // buffer while nothing has written device memory since (the pairs of a backward:
  // ∂L/∂out·W and its transposed product with the input). epoch_ counts the writes other
  // than a GEMM's C (kernels, memsets, cuDNN); a C or a copy drops the entries it overlaps.
  struct Converted {
    const float* x = nullptr;
    size_t count = 0;
    uint64_t epoch = 0;
    Buffer buf;
    uint64_t used = 0;
  };
  std::array<Converted, 4> converted_;
  uint64_t epoch_ = 1, use_clock_ = 0;
  Buffer qk_scratch_;             // the q/k norms' fp32 output before RoPE (bf16 mode)
  Buffer dlogits_;                // the LM head's bf16 ∂L/∂logits, a chunk of rows (bf16 mode)
  Buffer swiglu_grads_;           // SwiGLU's bf16 ∂L/∂gate | ∂L/∂up (bf16 mode)
  Buffer rope_grads_;             // RoPE backward's bf16 ∂L/∂q | ∂L/∂k (bf16 mode)
  Buffer packed_buf_;             // the packed q|k|v projection, or its gradient (bf16 mode)
  bool packed_ = false;           // bf16 mode: q|k|v and gate|up projections packed (SINKSCOPE_CUDA_PACKED)
  std::map<GemmKey, GemmPlan> gemm_plans_;
  std::set<GemmKey> no_bias_plans_;  // shapes whose bias epilogue cuBLASLt cannot do
  std::map<uintptr_t, Shadow> shadows_;  // by the fp32 tensor's address
  std::map<const void*, size_t> alloc_bytes_;  // bf16 mode: each allocation's size (Free drops its copies)
  std::map<const void*, void*> mirrors_;       // bf16 mode: an allocation's bf16 mirror (Shadow)
#ifdef SINKSCOPE_CUDNN_ATTENTION
  cudnnHandle_t cudnn_ = nullptr;
  std::unique_ptr<cuda::CudnnAttentionCache> cudnn_cache_;  // null: the tiled kernel only
  std::set<std::tuple<int, int, int, int, int>> cudnn_refused_, cudnn_used_;  // (B, T, H, KV, dh)
  Buffer cudnn_workspace_, cudnn_scratch_, cudnn_grads_;
#endif
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

bool CudaAttentionRanThroughCudnn(Backend& backend) {
  auto* cuda = dynamic_cast<CudaBackend*>(&backend);
  return cuda != nullptr && cuda->ran_cudnn_attention();
}

void* CudaStreamOf(Backend& backend) {
  auto* cuda = dynamic_cast<CudaBackend*>(&backend);
  return cuda != nullptr ? static_cast<void*>(cuda->stream()) : nullptr;
}

StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int index, CudaPrecision precision) {
  ASSIGN_OR_RETURN(CudaDeviceInfo info, DescribeCudaDevice(index));
  (void)info;
  auto be = std::make_unique<CudaBackend>(index, precision);
  RETURN_IF_ERROR(be->Init());
  return std::unique_ptr<Backend>(std::move(be));
}

}  // namespace sinkscope
