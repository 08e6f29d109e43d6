#include "engine/probes.h"

#include <functional>

#include <algorithm>
#include <cstring>
#include <cmath>

namespace sinkscope {

const char* ReduceModeName(ReduceMode mode) {
  return mode == ReduceMode::kSumThenNorm ? "SUM_THEN_NORM" : "NORM_THEN_MEAN";
}

const char* SiteName(Site site) {
  switch (site) {
    case Site::kXn: return "xn";
    case Site::kXm: return "xm";
    case Site::kHIn: return "h_in";
    case Site::kHHalf: return "h_half";
    case Site::kHOut: return "h_out";
    case Site::kQ: return "q";
    case Site::kK: return "k";
    case Site::kV: return "v";
    case Site::kVHat: return "vh";
  }
  return "?";
}

Status ProbeSettings::Validate(int T) const {
  const std::string t = std::to_string(T);
  if (sink_position < 0 || sink_position >= T) {
    return InvalidArgumentError("probe.sink_position s = " + std::to_string(sink_position) +
                                " lies outside the context [0, " + t + ")");
  }
  if (ref_span < 1 || ref_span >= T) {
    return InvalidArgumentError("probe.ref_span T_e = " + std::to_string(ref_span) + " must be in [1, T) = [1, " + t +
                                ") (R_GS sums tokens 0…T_e)");
  }
  if (profile_len < 1 || profile_len > T) {
    return InvalidArgumentError("probe.profile_len P = " + std::to_string(profile_len) + " must be in [1, T] = [1, " +
                                t + "]");
  }
  if (sink_position > ref_span) {
    return InvalidArgumentError("probe.sink_position s = " + std::to_string(sink_position) +
                                " must lie within the reference span [0, T_e] = [0, " + std::to_string(ref_span) +
                                "] (Definition 1: 0 ≤ s ≤ T_e); raise probe.ref_span");
  }
  if (!(eps > 0 && eps < 1)) return InvalidArgumentError("probe.eps ε must be in (0, 1)");
  if (t_eps < 1) return InvalidArgumentError("probe.t_eps T_ε must be positive");
  return OkStatus();
}

double GradientSinkRatio(const std::vector<double>& n, int s, int ref_span) {
  double ref = 0;
  for (int t = 0; t <= ref_span; ++t) {
    if (t != s) ref += n[t];
  }
  ref /= ref_span;  // eq. (3), Definition 1
  return n[s] / ref;
}

double TokenNormRatio(const std::vector<double>& norms, int s) {
  const int last = std::min<int>(15, static_cast<int>(norms.size()) - 1);
  double ref = 0;
  int count = 0;
  for (int t = 1; t <= last; ++t) {
    if (t == s) continue;  // the window is tokens 1…15 other than s (Figure 7)
    ref += norms[t];
    ++count;
  }
  if (count == 0) return NAN;  // T = 2 with s = 1: no reference token exists
  return norms[s] / (ref / count);
}

double Quantile(std::vector<double> v, double q) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  const double pos = q * (v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (pos - lo) * (v[hi] - v[lo]);
}

namespace {
constexpr int kNumSites = static_cast<int>(kProfileSites.size());
constexpr const char* kNormNames[] = {"h_in", "h_half", "h_out", "r_attn", "r_mlp", "v", "vh"};
constexpr int kNumNorms = 7;
int SiteIndex(Site s) { return static_cast<int>(s); }  // kProfileSites lists the enum in order

}  // namespace

// Per-layer accumulators; device buffers are summed over micro-batches.
struct ProbeCollector::LayerAcc {
  std::array<float*, kNumSites> sum{};       // (K, C_site): Σ_b g[b,t]
  std::array<float*, kNumSites> norm_sum{};  // (K): Σ_b ‖g[b,t]‖
  std::array<int, kNumSites> channels{};
  float* attn_g3_norm_sum = nullptr;  // (K): Σ_b ‖∂L/∂h_in − ∂L/∂h_half‖
  float* mlp_g3_norm_sum = nullptr;   // (K): Σ_b ‖∂L/∂h_half − ∂L/∂h_out‖
  std::array<float*, kNumNorms> act_norm_sum{};
  std::vector<double> alpha, mass, second, above;  // per head, Σ over micro-batches of B·value
  // Attention arms, per head: Σ over sequences of the per-sequence value.
  std::vector<double> unassigned, gate_mean, gate_sink, gate_rest;
  // Every |h_out| value of the probe batch, for the median: on the device, a chunk per
  // micro-batch (the radix select counts them where they are); on the host, those of a
  // micro-batch that did not fit (ProbeCollector::kMaxDeviceKeepBytes, or device memory).
  std::vector<std::pair<float*, size_t>> abs_chunks;
  std::vector<float> abs_host;
  double median = 0;  // the lower median, once median_done (ReduceAcross or Finish)
  bool median_done = false, median_none = false;
  // Each micro-batch's three largest |h_out| values and the index of the largest, in
  // micro-batch order: read from the device only when merged (MergeTops), so the forward
  // never waits on them. `tops`: 4 device doubles at the end of the micro-batch's chunk
  // (null: `host` holds them).
  struct PendingTop3 {
    double* tops = nullptr;
    std::array<double, 4> host{};
    int64_t first_sequence = 0;  // the micro-batch's first sequence in the probe batch
    int T = 0, d = 0;
  };
  std::vector<PendingTop3> pending_tops;
  std::array<double, 3> top3{-1, -1, -1};
  int64_t top1_seq = 0;
  int top1_tok = 0, top1_ch = 0;
};

ProbeCollector::ProbeCollector(Model& model, const ProbeSettings& settings, int T)
    : model_(model), settings_(settings), T_(T) {
  K_ = std::min(T, std::max({settings.profile_len, settings.ref_span + 1, 16}));
  const ModelConfig& c = model.config();
  Backend& be = *model.backend();
  for (int l = 0; l < c.layers; ++l) {
    auto* a = new LayerAcc;
    for (Site s : kProfileSites) {
      const int i = SiteIndex(s);
      a->channels[i] = s == Site::kQ ? c.q_dim() : (s == Site::kK || s == Site::kV || s == Site::kVHat) ? c.kv_dim()
                                                                                                       : c.d_model;
      a->sum[i] = be.Alloc(static_cast<size_t>(K_) * a->channels[i]);
      a->norm_sum[i] = be.Alloc(K_);
    }
    a->attn_g3_norm_sum = be.Alloc(K_);
    a->mlp_g3_norm_sum = be.Alloc(K_);
    for (auto& p : a->act_norm_sum) p = be.Alloc(K_);
    a->alpha.assign(c.heads, 0.0);
    a->mass.assign(c.heads, 0.0);
    a->second.assign(c.heads, 0.0);
    a->above.assign(c.heads, 0.0);
    if (c.attention != AttentionKind::kSoftmax) a->unassigned.assign(c.heads, 0.0);
    if (c.gate != GateKind::kNone) {
      const int groups = c.gate == GateKind::kValue ? c.kv_heads : c.heads;
      a->gate_mean.assign(groups, 0.0);
      a->gate_sink.assign(groups, 0.0);
      a->gate_rest.assign(groups, 0.0);
    }
    acc_.push_back(a);
  }
  // θ as the pass sees it: read now, before the step's update (Trainer::ProbedStep runs
  // the optimizer before Finish), and only θ's own entries, not the whole buffer.
  for (int l = 0; l < c.layers; ++l) {
    std::vector<float> th(c.kv_heads, 0.0f);
    const ParamTensor* t = model.FindTensor("model.layers." + std::to_string(l) + ".self_attn.vscale_theta");
    if (c.vscale == VScaleMode::kVScale && t != nullptr) th = model.TensorToHost(*t);
    theta_.push_back(std::move(th));
  }
}

ProbeCollector::~ProbeCollector() {
  Backend& be = *model_.backend();
  for (LayerAcc* a : acc_) {
    for (float* p : a->sum) be.Free(p);
    for (float* p : a->norm_sum) be.Free(p);
    for (float* p : a->act_norm_sum) be.Free(p);
    be.Free(a->attn_g3_norm_sum);
    be.Free(a->mlp_g3_norm_sum);
    for (const auto& [chunk, n] : a->abs_chunks) be.Free(chunk);
    delete a;
  }
  if (scratch_) be.Free(scratch_);
  if (massive_) be.Free(massive_);
}

float* ProbeCollector::Scratch(size_t n) {
  if (n > scratch_size_) {
    if (scratch_) model_.backend()->Free(scratch_);
    scratch_ = model_.backend()->Alloc(n);
    scratch_size_ = n;
  }
  return scratch_;
}

// On a backend that keeps A (BlockActivations::att, the CPU reference): column s read
// directly, with the same definitions as the softmax path (METRICS.md "Forward
// observables"), and each row's unassigned mass averaged over the rows of a sequence.
void ProbeCollector::AttentionArmStats(LayerAcc& a, const BlockActivations& x, int B, int T,
                                       const ColumnStatsRequest& req) {
  const int H = model_.config().heads, s = req.sink_position;
  std::vector<float> att(static_cast<size_t>(B) * H * T * T);
  model_.backend()->ToHost(att.data(), x.att, att.size() * sizeof(float));
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      const size_t bh = static_cast<size_t>(b) * H + h;
      double alpha = 0, mass = 0, second = 0;
      for (int t = s; t < T; ++t) {
        const double a_ts = att[(bh * T + t) * T + s];
        mass += a_ts;
        second += a_ts * a_ts;
        if (t < s + req.window) alpha += a_ts;
      }
      alpha /= req.window;
      a.alpha[h] += alpha;
      a.mass[h] += mass;
      a.second[h] += second;
      a.above[h] += alpha > req.threshold ? 1 : 0;
    }
  }
  UnassignedStats(a, x, B, T);
}

// Each row's unassigned mass (B,H,T), averaged over the rows of a sequence.
void ProbeCollector::UnassignedStats(LayerAcc& a, const BlockActivations& x, int B, int T) {
  const int H = model_.config().heads;
  std::vector<float> un(static_cast<size_t>(B) * H * T);
  model_.backend()->ToHost(un.data(), x.unassigned, un.size() * sizeof(float));
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      const size_t bh = static_cast<size_t>(b) * H + h;
      double unassigned = 0;
      for (int t = 0; t < T; ++t) unassigned += un[bh * T + t];
      a.unassigned[h] += unassigned / T;
    }
  }
}

// σ of the gate logits (B,T,G) grouped by head: G = H·dh (output), H (head), KV·dh (value).
void ProbeCollector::GateStats(LayerAcc& a, const BlockActivations& x, int B, int T) {
  const ModelConfig& c = model_.config();
  const int G = c.GateRows(), groups = static_cast<int>(a.gate_mean.size()), per = G / groups;
  const int s = settings_.sink_position, last = std::min(15, T - 1);
  std::vector<float> logits(static_cast<size_t>(B) * T * G);
  model_.backend()->ToHost(logits.data(), x.gate_logits, logits.size() * sizeof(float));
  for (int b = 0; b < B; ++b) {
    for (int g = 0; g < groups; ++g) {
      double all = 0, sink = 0, rest = 0;
      int rest_tokens = 0;
      for (int t = 0; t < T; ++t) {
        double mean = 0;  // over the head's channels
        for (int j = 0; j < per; ++j) {
          mean += 1.0 / (1.0 + std::exp(-static_cast<double>(logits[(static_cast<size_t>(b) * T + t) * G + g * per + j])));
        }
        mean /= per;
        all += mean;
        if (t == s) sink = mean;
        if (t >= 1 && t <= last && t != s) {
          rest += mean;
          ++rest_tokens;
        }
      }
      a.gate_mean[g] += all / T;
      a.gate_sink[g] += sink;
      a.gate_rest[g] += rest_tokens > 0 ? rest / rest_tokens : NAN;
    }
  }
}

void ProbeCollector::OnBlockForward(int layer, const BlockActivations& x, int B, int T) {
  Backend& be = *model_.backend();
  const ModelConfig& c = model_.config();
  LayerAcc& a = *acc_[layer];
  const int d = c.d_model, KV = c.kv_heads, dh = c.head_dim, H = c.heads;
  const TensorView acts[kNumNorms] = {x.h_in, x.h_half, x.h_out, x.r_attn, x.r_mlp, x.v, x.vhat};
  for (int i = 0; i < kNumNorms; ++i) {
    const bool per_kv_head = i >= 5;  // v and v̂: one norm per KV head, then the mean
    be.AccumulateTokenNormSum(a.act_norm_sum[i], acts[i], B, T, per_kv_head ? KV : 1, per_kv_head ? dh : d, K_);
  }
  // Attention column statistics, recomputed from q and k.
  ColumnStatsRequest req;
  req.sink_position = settings_.sink_position;
  req.window = std::min(settings_.t_eps, T - settings_.sink_position);
  req.threshold = settings_.eps;
  if (c.attention != AttentionKind::kSoftmax && x.att != nullptr) {
    AttentionArmStats(a, x, B, T, req);
  } else {
    // Softmax, and an arm on a backend that keeps no weights: column s recomputed on the
    // device from q, k and the forward's per-row numbers.
    std::vector<float> dev(4 * H);
    float* out = Scratch(4 * H);
    if (c.attention == AttentionKind::kSoftmax) {
      be.AttentionColumnStats(out, out + H, out + 2 * H, out + 3 * H, x.q, x.k, x.lse, B, T, H, KV, dh, req);
    } else {
      be.ArmAttentionColumnStats(out, out + H, out + 2 * H, out + 3 * H, x.q, x.k, x.arm_workspace, B, T, H, KV, dh,
                                 model_.ArmParams(), req);
      UnassignedStats(a, x, B, T);
    }
    be.ToHost(dev.data(), out, 4 * H * sizeof(float));
    for (int h = 0; h < H; ++h) {
      a.alpha[h] += static_cast<double>(dev[h]) * B;
      a.mass[h] += static_cast<double>(dev[H + h]) * B;
      a.second[h] += static_cast<double>(dev[2 * H + h]) * B;
      a.above[h] += std::round(static_cast<double>(dev[3 * H + h]) * B);  // a count of sequences
    }
  }
  if (x.gate_logits != nullptr) GateStats(a, x, B, T);
  // Massive activations (Sun et al. 2024): |h_out| kept on the device for the median,
  // and its three largest values with the place of the largest found there (within the
  // device budget); those four numbers are read when the layer's tops are merged.
  const size_t n = static_cast<size_t>(B) * T * d;
  if (massive_ == nullptr) massive_ = be.AllocScalars(256);
  LayerAcc::PendingTop3 pending;
  pending.first_sequence = sequences_;
  pending.T = T;
  pending.d = d;
  // A chunk: the n values, then (8-byte aligned) the 4 doubles of its top three.
  const size_t tops_at = (n + 1) / 2 * 2;
  float* chunk = nullptr;
  if (massive_ != nullptr && device_keep_bytes_ + n * sizeof(float) <= device_keep_budget_) {
    chunk = be.Alloc(tops_at + 4 * sizeof(double) / sizeof(float));
  }
  if (chunk != nullptr) {
    pending.tops = reinterpret_cast<double*>(chunk + tops_at);
    device_keep_bytes_ += n * sizeof(float);
    a.abs_chunks.emplace_back(chunk, n);
    be.AbsTop3(chunk, pending.tops, x.h_out, n);
  } else {
    // Past the device budget (or out of device memory): this micro-batch's values are
    // kept on the host, as the probe always did before.
    const size_t at = a.abs_host.size();
    a.abs_host.resize(at + n);
    be.ToHost(a.abs_host.data() + at, x.h_out, n * sizeof(float));
    HostAbsTop3(a.abs_host.data() + at, n, pending.host.data());
  }
  a.pending_tops.push_back(pending);
  if (layer == c.layers - 1) sequences_ += B;
}

void ProbeCollector::OnGradient(int layer, Site site, const float* grad, const float* downstream, int B, int T) {
  Backend& be = *model_.backend();
  LayerAcc& a = *acc_[layer];
  const int i = SiteIndex(site);
  const int C = a.channels[i];
  be.AccumulateTokenSum(a.sum[i], grad, B, T, C, K_);
  be.AccumulateTokenNormSum(a.norm_sum[i], grad, B, T, 1, C, K_);
  if (downstream != nullptr) {  // g3 = ∂L/∂(residual in) − ∂L/∂(residual out), eq. (4)
    const size_t n = static_cast<size_t>(B) * T * C;
    float* diff = Scratch(n);
    be.Copy(diff, grad, n);
    be.Axpy(diff, -1.0f, downstream, n);
    be.AccumulateTokenNormSum(site == Site::kHIn ? a.attn_g3_norm_sum : a.mlp_g3_norm_sum, diff, B, T, 1, C, K_);
  }
}

// The lower median, element (N−1)/2 of the sorted values (torch.median's convention,
// which the golden reference uses; METRICS.md leaves it open), of the |h_out| values kept
// on the device, over every rank when `comm` is given. A radix select: non-negative
// floats order as their bits, so four passes each count the next byte of the keys that
// share the bytes chosen so far and choose the byte the median has; exact, and only 256
// counts a pass leave the device.
Status ProbeCollector::SelectMedian(LayerAcc& a, Communicator* comm, HostStaging* host) {
  Backend& be = *model_.backend();
  uint32_t prefix = 0;
  double rank = 0;  // of the median among the keys under `prefix`
  for (int shift = 24; shift >= 0; shift -= 8) {
    std::array<double, 256> counts{};
    for (const auto& [chunk, n] : a.abs_chunks) {  // massive_ exists: the chunks were made with it
      std::array<double, 256> c;
      be.RadixCount(massive_, chunk, n, shift, prefix);
      be.ReadScalars(c.data(), massive_, c.size());
      for (size_t i = 0; i < c.size(); ++i) counts[i] += c[i];
    }
    HostRadixCount(counts.data(), a.abs_host.data(), a.abs_host.size(), shift, prefix);
    if (comm != nullptr) RETURN_IF_ERROR(host->AllReduceSum(*comm, counts.data(), counts.size()));
    if (shift == 24) {
      double total = 0;
      for (double c : counts) total += c;
      if (total == 0) {
        a.median_done = a.median_none = true;
        return OkStatus();
      }
      rank = std::floor((total - 1) / 2);
    }
    uint32_t byte = 0;
    while (byte < 255 && rank >= counts[byte]) rank -= counts[byte++];
    prefix = (prefix << 8) | byte;
  }
  float median;
  std::memcpy(&median, &prefix, sizeof median);
  a.median = median;
  a.median_done = true;
  return OkStatus();
}

// Merges the layer's pending micro-batch tops into top3 and the top one's place, in
// micro-batch order (an earlier micro-batch keeps a tie, as a scan in order would).
void ProbeCollector::MergeTops(LayerAcc& a) {
  Backend& be = *model_.backend();
  for (LayerAcc::PendingTop3& p : a.pending_tops) {
    std::array<double, 4> top = p.host;
    if (p.tops != nullptr) be.ReadScalars(top.data(), p.tops, top.size());  // in its chunk, freed with it
    if (InsertTop3(a.top3.data(), top[0])) {  // strictly larger: an earlier tie stays
      const auto i = static_cast<size_t>(top[3]);
      a.top1_seq = p.first_sequence + static_cast<int64_t>(i / (static_cast<size_t>(p.T) * p.d));
      a.top1_tok = static_cast<int>((i / p.d) % p.T);
      a.top1_ch = static_cast<int>(i % p.d);
    }
    InsertTop3(a.top3.data(), top[1]);  // the three largest of both (a multiset)
    InsertTop3(a.top3.data(), top[2]);
  }
  a.pending_tops.clear();
}

Status ProbeCollector::ReduceAcross(Communicator& comm, int rows) {
  const int W = comm.world_size(), rank = comm.rank();
  if (W == 1) return OkStatus();
  HostStaging host(*model_.backend());  // the host values below, through a backend buffer
  for (LayerAcc* a : acc_) {
    for (int i = 0; i < kNumSites; ++i) {
      RETURN_IF_ERROR(comm.AllReduceSum(a->sum[i], static_cast<size_t>(K_) * a->channels[i]));
      RETURN_IF_ERROR(comm.AllReduceSum(a->norm_sum[i], K_));
    }
    RETURN_IF_ERROR(comm.AllReduceSum(a->attn_g3_norm_sum, K_));
    RETURN_IF_ERROR(comm.AllReduceSum(a->mlp_g3_norm_sum, K_));
    for (float* p : a->act_norm_sum) RETURN_IF_ERROR(comm.AllReduceSum(p, K_));
    for (std::vector<double>* v : {&a->alpha, &a->mass, &a->second, &a->above, &a->unassigned, &a->gate_mean,
                                   &a->gate_sink, &a->gate_rest}) {
      if (!v->empty()) RETURN_IF_ERROR(host.AllReduceSum(comm, v->data(), v->size()));
    }
    // The largest |h_out| values: each rank's top 3 with the top 1's place in the global
    // batch (rank r holds rows r·rows … of every micro-batch of B = W·rows sequences).
    MergeTops(*a);
    const int64_t local = a->top1_seq;
    const int64_t global_seq = (local / rows) * static_cast<int64_t>(rows) * W + rank * rows + local % rows;
    double mine[6] = {a->top3[0], a->top3[1], a->top3[2], static_cast<double>(global_seq),
                      static_cast<double>(a->top1_tok), static_cast<double>(a->top1_ch)};
    std::vector<double> all(6 * static_cast<size_t>(W));
    RETURN_IF_ERROR(host.AllGather(comm, mine, all.data(), sizeof mine));
    std::vector<double> values;
    int best = 0;
    for (int r = 0; r < W; ++r) {
      for (int k = 0; k < 3; ++k) values.push_back(all[6 * r + k]);
      // The single rank's scan keeps the first of equal values: the lowest place wins ties.
      const double v = all[6 * r], bv = all[6 * best];
      if (v > bv || (v == bv && all[6 * r + 3] < all[6 * best + 3])) best = r;
    }
    std::sort(values.begin(), values.end(), std::greater<double>());
    a->top3 = {values[0], values[1], values[2]};
    a->top1_seq = static_cast<int64_t>(all[6 * best + 3]);
    a->top1_tok = static_cast<int>(all[6 * best + 4]);
    a->top1_ch = static_cast<int>(all[6 * best + 5]);
    // The median of every rank's |h_out| values: the radix select's counts summed over
    // the ranks (256 numbers a pass), not the values gathered.
    RETURN_IF_ERROR(SelectMedian(*a, &comm, &host));
  }
  double seqs = sequences_;
  RETURN_IF_ERROR(host.AllReduceSum(comm, &seqs, 1));
  sequences_ = static_cast<int>(seqs);
  return OkStatus();
}

ProbeReport ProbeCollector::Finish(int64_t step, double loss) {
  Backend& be = *model_.backend();
  const ModelConfig& c = model_.config();
  const ProbeSettings& st = settings_;
  const bool sum_mode = st.reduce == ReduceMode::kSumThenNorm;
  const int P = st.profile_len, K = K_;
  const double B = std::max(sequences_, 1);
  ProbeReport r;
  r.step = step;
  r.loss = loss;
  r.settings = st;
  r.batch_sequences = sequences_;
  r.seq_len = T_;
  auto download = [&](const float* p, size_t n) {
    std::vector<float> h(n);
    be.ToHost(h.data(), p, n * sizeof(float));
    return std::vector<double>(h.begin(), h.end());
  };
  auto row_norm = [](const std::vector<double>& m, int t, int C) {
    double s = 0;
    for (int j = 0; j < C; ++j) s += m[static_cast<size_t>(t) * C + j] * m[static_cast<size_t>(t) * C + j];
    return std::sqrt(s);
  };
  std::vector<double> rgs_all;
  for (int l = 0; l < c.layers; ++l) {
    LayerAcc& a = *acc_[l];
    LayerProbe lp;
    lp.layer = l;
    // N_t in both modes at every site.
    std::array<std::vector<double>, kNumSites> sums, n_sum, n_mean;
    for (int i = 0; i < kNumSites; ++i) {
      sums[i] = download(a.sum[i], static_cast<size_t>(K) * a.channels[i]);
      n_mean[i] = download(a.norm_sum[i], K);
      n_sum[i].resize(K);
      for (int t = 0; t < K; ++t) {
        n_sum[i][t] = row_norm(sums[i], t, a.channels[i]);
        n_mean[i][t] /= B;
      }
    }
    const auto& N = sum_mode ? n_sum : n_mean;
    const int xn = SiteIndex(Site::kXn);
    lp.r_gs_sum_then_norm = GradientSinkRatio(n_sum[xn], st.sink_position, st.ref_span);
    lp.r_gs_norm_then_mean = GradientSinkRatio(n_mean[xn], st.sink_position, st.ref_span);
    lp.r_gs = sum_mode ? lp.r_gs_sum_then_norm : lp.r_gs_norm_then_mean;
    rgs_all.push_back(lp.r_gs);
    for (Site s : kProfileSites) {
      lp.grad_profile[SiteName(s)].assign(N[SiteIndex(s)].begin(), N[SiteIndex(s)].begin() + P);
    }
    // Reshaping ratios, eq. (4).
    const int d = c.d_model;
    std::vector<double> attn_g3(K), mlp_g3(K);
    if (sum_mode) {  // Σ_b is linear: Σ_b g3 = Σ_b ∂h_in − Σ_b ∂h_half
      const auto& hin = sums[SiteIndex(Site::kHIn)];
      const auto& hhalf = sums[SiteIndex(Site::kHHalf)];
      const auto& hout = sums[SiteIndex(Site::kHOut)];
      for (int t = 0; t < K; ++t) {
        double sa = 0, sm = 0;
        for (int j = 0; j < d; ++j) {
          const size_t k = static_cast<size_t>(t) * d + j;
          sa += (hin[k] - hhalf[k]) * (hin[k] - hhalf[k]);
          sm += (hhalf[k] - hout[k]) * (hhalf[k] - hout[k]);
        }
        attn_g3[t] = std::sqrt(sa);
        mlp_g3[t] = std::sqrt(sm);
      }
    } else {
      attn_g3 = download(a.attn_g3_norm_sum, K);
      mlp_g3 = download(a.mlp_g3_norm_sum, K);
      for (int t = 0; t < K; ++t) {
        attn_g3[t] /= B;
        mlp_g3[t] /= B;
      }
    }
    const auto& g_in = N[SiteIndex(Site::kHIn)];
    const auto& g_half = N[SiteIndex(Site::kHHalf)];
    const auto& g_out = N[SiteIndex(Site::kHOut)];
    const auto& g_xn = N[SiteIndex(Site::kXn)];
    const auto& g_xm = N[SiteIndex(Site::kXm)];
    for (int t = 0; t < P; ++t) {
      lp.attn_bloat.push_back(g_xn[t] / g_half[t]);
      lp.attn_change.push_back(g_in[t] / g_half[t]);
      lp.attn_compress.push_back(attn_g3[t] / g_xn[t]);
      lp.mlp_bloat.push_back(g_xm[t] / g_out[t]);
      lp.mlp_change.push_back(g_half[t] / g_out[t]);
      lp.mlp_compress.push_back(mlp_g3[t] / g_xm[t]);
    }
    // Attention statistics.
    int sinks = 0;
    double per_sample = 0;
    for (int h = 0; h < c.heads; ++h) {
      lp.alpha.push_back(a.alpha[h] / B);
      lp.column_mass.push_back(a.mass[h] / B);
      lp.column_second_moment.push_back(a.second[h] / B);
      lp.per_sample_sink_fraction.push_back(a.above[h] / B);
      if (lp.alpha.back() > st.eps) ++sinks;  // eq. (1)
      per_sample += lp.per_sample_sink_fraction.back();
    }
    lp.sink_rate = static_cast<double>(sinks) / c.heads;
    for (double u : a.unassigned) lp.unassigned_mass.push_back(u / B);
    for (size_t g = 0; g < a.gate_mean.size(); ++g) {
      lp.gate_mean.push_back(a.gate_mean[g] / B);
      lp.gate_sink.push_back(a.gate_sink[g] / B);
      lp.gate_rest.push_back(a.gate_rest[g] / B);
    }
    lp.sink_rate_per_sample = per_sample / c.heads;
    // Activation norms (batch means; v and v̂ also averaged over KV heads).
    for (int i = 0; i < kNumNorms; ++i) {
      std::vector<double> v = download(a.act_norm_sum[i], K);
      const double denom = i >= 5 ? B * c.kv_heads : B;
      for (double& x : v) x /= denom;
      lp.norm_ratio[kNormNames[i]] = TokenNormRatio(v, st.sink_position);
      v.resize(P);
      lp.norms[kNormNames[i]] = std::move(v);
    }
    // Massive activations.
    MergeTops(a);
    MassiveActivations& m = lp.massive;
    m.top3 = a.top3;
    m.top1_sequence = a.top1_seq;
    m.top1_token = a.top1_tok;
    m.top1_channel = a.top1_ch;
    if (!a.median_done) (void)SelectMedian(a, nullptr, nullptr);  // one rank: nothing to fail
    if (!a.median_none) {
      m.median = a.median;
      m.top1_over_median = m.top3[0] / m.median;
    }
    // V-scale θ and C.
    for (int g = 0; g < c.kv_heads; ++g) {
      const double th = theta_[l][g];
      lp.theta.push_back(th);
      lp.c.push_back(model_.VScaleCBase() * std::exp(th));
    }
    r.layers.push_back(std::move(lp));
  }
  r.r_gs_median = Quantile(rgs_all, 0.5);
  r.r_gs_q1 = Quantile(rgs_all, 0.25);
  r.r_gs_q3 = Quantile(rgs_all, 0.75);
  return r;
}

StatusOr<ProbeReport> RunDiagnosticPass(Model& model, const ProbeSettings& settings, const int32_t* inputs,
                                        const int32_t* targets, int B, int T, int64_t step,
                                        const DiagnosticOptions& options) {
  RETURN_IF_ERROR(settings.Validate(T));
  if (T > model.config().context) {
    return InvalidArgumentError("probe sequences of " + std::to_string(T) + " tokens exceed model.context " +
                                std::to_string(model.config().context));
  }
  if (options.micro_batch < 0) return InvalidArgumentError("micro_batch must not be negative");
  const int M = options.micro_batch == 0 ? B : std::min(options.micro_batch, B);
  RETURN_IF_ERROR(model.PrepareActivations(M, T));  // the memory of a pass, or why not
  ProbeCollector collector(model, settings, T);
  collector.set_device_keep_budget(options.device_keep_budget);
  model.ZeroGrad();
  // Every micro-batch's backward is of the whole batch's mean loss: ∂(Σ tokens)/(B·T).
  const float grad_scale = 1.0f / (static_cast<float>(B) * T);
  double loss_sum = 0;
  const int total = (B + M - 1) / M;
  for (int i = 0; i < total; ++i) {
    if (options.stop && options.stop()) {
      model.ZeroGrad();
      return Status(StatusCode::kCancelled, "the diagnostic pass was stopped after " + std::to_string(i) + " of " +
                                                std::to_string(total) + " micro-batches");
    }
    const int first = i * M, n = std::min(M, B - first);
    const size_t at = static_cast<size_t>(first) * T;
    loss_sum += model.ForwardBackward(inputs + at, targets + at, n, T, grad_scale, &collector) * n;
    if (options.progress) options.progress(i + 1, total);
  }
  model.ZeroGrad();
  return collector.Finish(step, loss_sum / B);
}

double EstimateDiagnosticBytes(const ModelConfig& c, int micro_batch, int T, bool training, bool recompute_blocks) {
  return (training ? 16 : 4) * c.ParameterCount() + c.ActivationBytes(micro_batch, T, recompute_blocks);
}

}  // namespace sinkscope
