// The paper's per-layer measurements (METRICS.md), computed from one forward and
// backward pass over a probe batch: gradient-sink ratio, token-wise gradient profiles,
// Bloat/Change/Compress, attention column statistics and sink rates, activation norms,
// massive activations, V-scale θ and C. Built from Backend reductions only, so any
// backend computes them where its buffers live.
#pragma once

#include <array>
#include <functional>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "engine/communicator.h"
#include "engine/model.h"

namespace sinkscope {

enum class ReduceMode {
  kSumThenNorm,   // N_t = ‖Σ_b g[b,t]‖₂ (default; the paper)
  kNormThenMean,  // N_t = (1/B) Σ_b ‖g[b,t]‖₂
};
const char* ReduceModeName(ReduceMode mode);

struct ProbeSettings {
  int sink_position = 0;  // s
  int ref_span = 31;      // T_e
  int profile_len = 64;   // P
  double eps = 0.3;       // ε
  int t_eps = 64;         // T_ε (clipped to T − s)
  ReduceMode reduce = ReduceMode::kSumThenNorm;

  // Rejects settings that do not fit sequences of length T; names the field.
  Status Validate(int T) const;
};

// Version of the ProbeReport layout; bump when a field changes meaning.
inline constexpr int kProbeReportVersion = 1;

// Gradient sites of the profiles, in report order, and their report names.
inline constexpr std::array<Site, 9> kProfileSites = {Site::kXn, Site::kXm,  Site::kHIn, Site::kHHalf, Site::kHOut,
                                                      Site::kQ,  Site::kK,   Site::kV,   Site::kVHat};
const char* SiteName(Site site);  // "xn", "xm", "h_in", "h_half", "h_out", "q", "k", "v", "vh"

struct MassiveActivations {
  std::array<double, 3> top3{};  // largest |h_out| values over (b, t, channel), descending
  int64_t top1_sequence = 0;     // b within the probe batch
  int top1_token = 0;            // t
  int top1_channel = 0;          // channel
  double median = 0;             // lower median |h_out|: sorted element (n−1)/2
  double top1_over_median = 0;
};

struct LayerProbe {
  int layer = 0;
  double r_gs = 0;                // Definition 1 at x̃, in the settings' reduce mode
  double r_gs_sum_then_norm = 0;  // both modes, for comparison
  double r_gs_norm_then_mean = 0;
  // N_t for t < P at each site of kProfileSites (settings' reduce mode).
  std::map<std::string, std::vector<double>> grad_profile;
  // Eq. (4) per token t < P.
  std::vector<double> attn_bloat, attn_change, attn_compress, mlp_bloat, mlp_change, mlp_compress;
  // Attention per head (batch means): α_s, M_s, S_s; per-sample sink fraction.
  std::vector<double> alpha, column_mass, column_second_moment, per_sample_sink_fraction;
  double sink_rate = 0;             // fraction of heads with α_s > ε (eq. 1)
  double sink_rate_per_sample = 0;  // threshold each sequence, then average
  // Batch-mean ℓ2 norms per token t < P: h_in, h_half, h_out, r_attn, r_mlp, v, vh
  // (v and vh: mean over KV heads), and token s / mean over tokens 1…15 other than s of each.
  std::map<std::string, std::vector<double>> norms;
  std::map<std::string, double> norm_ratio;
  MassiveActivations massive;
  std::vector<double> theta, c;  // V-scale θ and C = d·dh·σ²·exp(θ) per KV head
  // Attention arms (docs/design/ARMS.md "Probes"); empty where the arm has none.
  // Per head, the batch mean of the row-mean mass a row gives no token: the virtual
  // sink's share (sink_logit, softmax_plus_one) or 1 − Σ_u a[t,u] (sigmoid, softpick),
  // signed (negative when a sigmoid row gives more than unit mass in total).
  std::vector<double> unassigned_mass;
  // Gated arms, per head (per KV head for the value gate), batch means of σ: over every
  // token and channel of the head; at token s; over tokens 1…15 other than s.
  std::vector<double> gate_mean, gate_sink, gate_rest;
};

struct ProbeReport {
  int version = kProbeReportVersion;
  int64_t step = 0;  // training step the probe belongs to (0: not from training)
  double loss = 0;   // mean token loss of the probe batch
  ProbeSettings settings;
  int batch_sequences = 0;  // B of the probe batch (all micro-batches)
  int seq_len = 0;          // T
  std::vector<LayerProbe> layers;
  // R_GS across layers (Figure 1): median and interquartile range (linear interpolation).
  double r_gs_median = 0, r_gs_q1 = 0, r_gs_q3 = 0;
};

// Collects the measurements while the model runs one or more micro-batches of a probe
// batch (it is the model's PassObserver), then turns them into a report. Probing reads
// buffers only: a step probed gives bit-identical weights to the same step unprobed.
class ProbeCollector final : public PassObserver {
 public:
  ProbeCollector(Model& model, const ProbeSettings& settings, int T);
  ~ProbeCollector() override;
  ProbeCollector(const ProbeCollector&) = delete;
  ProbeCollector& operator=(const ProbeCollector&) = delete;

  void OnBlockForward(int layer, const BlockActivations& acts, int B, int T) override;
  void OnGradient(int layer, Site site, const float* grad, const float* downstream, int B, int T) override;

  // Data parallelism: sums the accumulators over the ranks (and finds the largest |h_out|
  // values and the median of all of them, from counts summed over the ranks) so that every
  // rank's Finish gives the report of the global batch. `rows`: this rank's sequences per
  // micro-batch (B / world size).
  Status ReduceAcross(Communicator& comm, int rows);
  // Finishes the reductions. `loss` is the probe batch's mean loss.
  ProbeReport Finish(int64_t step, double loss);

  // |h_out| kept on the device for the median, every layer together (B·T·d·4 bytes a layer
  // and micro-batch); past it (a probe batch of many micro-batches) or where device memory
  // is short, a micro-batch's values are kept on the host instead. The report is the same
  // either way (tests set a smaller budget to cover both).
  static constexpr size_t kMaxDeviceKeepBytes = size_t{2} << 30;
  void set_device_keep_budget(size_t bytes) { device_keep_budget_ = bytes; }

 private:
  struct LayerAcc;
  float* Scratch(size_t n);
  void AttentionArmStats(LayerAcc& a, const BlockActivations& x, int B, int T, const ColumnStatsRequest& req);
  void UnassignedStats(LayerAcc& a, const BlockActivations& x, int B, int T);
  void GateStats(LayerAcc& a, const BlockActivations& x, int B, int T);
  // Folds the micro-batches' top three |h_out| values (read from the device now) into the
  // layer's.
  void MergeTops(LayerAcc& a);
  // The lower median of the layer's kept |h_out| values (over the ranks with `comm`).
  Status SelectMedian(LayerAcc& a, Communicator* comm, HostStaging* host);

  Model& model_;
  ProbeSettings settings_;
  int T_;
  int K_;  // tokens reduced: max(P, T_e + 1, 16) clipped to T
  int sequences_ = 0;
  std::vector<LayerAcc*> acc_;
  std::vector<std::vector<float>> theta_;  // [layer][kv head], at construction (before the update)
  float* scratch_ = nullptr;
  size_t scratch_size_ = 0;
  double* massive_ = nullptr;  // device doubles: RadixCount's 256
  size_t device_keep_bytes_ = 0;  // of |h_out| kept on the device, every layer
  size_t device_keep_budget_ = kMaxDeviceKeepBytes;
};

// How a diagnostic pass splits its batch, and what it reports while it runs.
struct DiagnosticOptions {
  // Sequences per forward and backward (0: all B at once). The micro-batches' gradients
  // are of the loss of the whole batch (each scaled by 1/(B·T)) and the probe sums run
  // over all of them, so the report equals that of one pass over the batch.
  int micro_batch = 0;
  // Called after each micro-batch with (done, total).
  std::function<void(int, int)> progress;
  // Asked before each micro-batch; true ends the pass with CANCELLED (nothing reported).
  std::function<bool()> stop;
  // ProbeCollector::set_device_keep_budget (tests: the host fallback of the median's values).
  size_t device_keep_budget = ProbeCollector::kMaxDeviceKeepBytes;
};

// A diagnostic pass: forward and backward on (B,T) tokens with no update (gradients are
// zeroed before and after), measured by a ProbeCollector.
StatusOr<ProbeReport> RunDiagnosticPass(Model& model, const ProbeSettings& settings, const int32_t* inputs,
                                        const int32_t* targets, int B, int T, int64_t step = 0,
                                        const DiagnosticOptions& options = {});

// Memory a diagnostic pass of micro-batches of `micro_batch` sequences of T tokens holds on
// the CPU backend: the parameters (4 B each; 16 with the gradients and AdamW state of a
// training model) and one micro-batch's activations.
double EstimateDiagnosticBytes(const ModelConfig& config, int micro_batch, int T, bool training,
                               bool recompute_blocks = false);

// Definition 1 from token-wise norms: N_s / ((1/T_e) Σ_{0≤t≤T_e, t≠s} N_t).
double GradientSinkRatio(const std::vector<double>& norms, int s, int ref_span);
// Figure 7's ratio: norms[s] / mean of norms[t] over t = 1…15 (clipped to the tokens
// kept), t ≠ s. NaN when no reference token exists (only T = 2 with s = 1).
double TokenNormRatio(const std::vector<double>& norms, int s);
// Quantile with linear interpolation between order statistics (as numpy's default).
double Quantile(std::vector<double> values, double q);

}  // namespace sinkscope
