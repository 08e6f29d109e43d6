#include "engine/model.h"

#include <cstdio>
#include <cstdlib>

#include "engine/bf16.h"

#include <cstring>
#include <algorithm>
#include <cmath>

#include "base/rng.h"

namespace sinkscope {

Model::Model(const ModelConfig& config, Backend* backend)
    : config_(config), rotary_(config.Rotary()), backend_(backend) {}

StatusOr<std::unique_ptr<Model>> Model::Create(const ModelConfig& config, Backend* backend, ModelOptions options) {
  RETURN_IF_ERROR(config.Validate());
  if (config.HasAttentionArm()) {
    const std::string arm = std::string("attention ") + AttentionKindName(config.attention) + ", gate " +
                            GateKindName(config.gate);
    if (!backend->Supports(OptionalOp::kAttentionArms)) {
      return FailedPreconditionError(
          "the attention arms (" + arm + ") run on the fp32 CPU backend and the CUDA backend; backend " +
          backend->Name() + " does not implement them (the CPU bf16 mode has no bf16 contract for them yet)");
    }
    if (options.matrices != WeightDtype::kF32) {
      return InvalidArgumentError("a model with " + arm + " is probed with fp32 weights only, not " +
                                  WeightDtypeName(options.matrices));
    }
  }
  std::unique_ptr<Model> m(new Model(config, backend));
  const int64_t d = config.d_model, V = config.vocab, F = config.ffn;
  const int64_t qd = config.q_dim(), kvd = config.kv_dim();
  size_t offset = 0, packed = 0;
  auto add = [&](std::string name, std::vector<int64_t> shape, bool decay, bool trainable = true) {
    size_t n = 1;
    for (int64_t s : shape) n *= static_cast<size_t>(s);
    offset = (offset + kParamAlignFloats - 1) / kParamAlignFloats * kParamAlignFloats;
    m->tensors_.push_back({std::move(name), std::move(shape), offset, n, packed, decay, trainable});
    const size_t at = offset;
    offset += n;
    packed += n;
    return at;
  };
  m->off_embed_ = add("model.embed_tokens.weight", {V, d}, true);
  for (int l = 0; l < config.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerOffsets o{};
    o.attn_norm = add(p + "input_layernorm.weight", {d}, false);
    o.wq = add(p + "self_attn.q_proj.weight", {qd, d}, true);
    o.wk = add(p + "self_attn.k_proj.weight", {kvd, d}, true);
    o.wv = add(p + "self_attn.v_proj.weight", {kvd, d}, true);
    o.wo = add(p + "self_attn.o_proj.weight", {d, qd}, true);
    if (config.attention_bias) {  // Qwen2: biases on q, k, v (not o)
      o.bq = add(p + "self_attn.q_proj.bias", {qd}, false);
      o.bk = add(p + "self_attn.k_proj.bias", {kvd}, false);
      o.bv = add(p + "self_attn.v_proj.bias", {kvd}, false);
    }
    if (config.qk_norm) {  // Qwen3: RMSNorm over each head of q and k, before RoPE
      o.q_norm = add(p + "self_attn.q_norm.weight", {config.head_dim}, false);
      o.k_norm = add(p + "self_attn.k_norm.weight", {config.head_dim}, false);
    }
    o.theta = add(p + "self_attn.vscale_theta", {config.kv_heads}, false, config.vscale == VScaleMode::kVScale);
    // Attention arms (docs/design/ARMS.md "Parameters"): gpt-oss's name for the sink logits.
    if (config.attention == AttentionKind::kSinkLogit) o.sinks = add(p + "self_attn.sinks", {config.heads}, false);
    if (config.gate == GateKind::kOutput || config.gate == GateKind::kHead) {
      o.gate_w = add(p + "self_attn.output_gate.weight", {config.GateRows(), d}, true);
    } else if (config.gate == GateKind::kValue) {
      o.gate_w = add(p + "self_attn.value_gate.weight", {config.GateRows(), d}, true);
    }
    o.mlp_norm = add(p + "post_attention_layernorm.weight", {d}, false);
    o.w_gate = add(p + "mlp.gate_proj.weight", {F, d}, true);
    o.w_up = add(p + "mlp.up_proj.weight", {F, d}, true);
    o.w_down = add(p + "mlp.down_proj.weight", {d, F}, true);
    m->layer_off_.push_back(o);
  }
  m->off_final_norm_ = add("model.norm.weight", {d}, false);
  m->off_head_ = config.tied_embeddings ? m->off_embed_ : add("lm_head.weight", {V, d}, true);
  m->num_params_ = packed;
  m->slab_floats_ = offset;
  m->recompute_ = options.recompute_blocks;
  m->scalars_ = backend->AllocScalars(2);
  if (options.matrices != WeightDtype::kF32) {
    if (options.training) {
      return InvalidArgumentError("16-bit weights are for probing only (ModelOptions.training = false)");
    }
    // 2-D weights in 16 bits; everything else fp32, compactly; the scratch they widen into.
    m->matrices_ = options.matrices;
    size_t store = 0, small = 0;
    for (const ParamTensor& t : m->tensors_) {
      const bool matrix = t.shape.size() == 2;
      m->store_off_.push_back(matrix ? store : static_cast<size_t>(-1));
      m->small_off_.push_back(matrix ? static_cast<size_t>(-1) : small);
      (matrix ? store : small) += t.size;
    }
    m->store16_.assign(store, 0);
    const size_t block = static_cast<size_t>(config.q_dim()) * d * 2 + static_cast<size_t>(config.kv_dim()) * d * 2 +
                         static_cast<size_t>(F) * d * 3;
    m->small_ = backend->Alloc(small);
    m->block_scratch_ = backend->Alloc(block);
    m->vocab_scratch_ = backend->Alloc(static_cast<size_t>(V) * d);
    if (!m->small_ || !m->block_scratch_ || !m->vocab_scratch_) {
      return InternalError("cannot allocate the fp32 parameters and scratch on backend " + std::string(backend->Name()));
    }
    return m;
  }
  m->params_ = backend->Alloc(offset);
  if (options.training) {
    m->grads_ = backend->Alloc(offset);
    m->adam_m_ = backend->Alloc(offset);
    m->adam_v_ = backend->Alloc(offset);
  }
  if (!m->params_ || (options.training && (!m->grads_ || !m->adam_m_ || !m->adam_v_))) {
    return InternalError("cannot allocate " + std::to_string(offset) + " parameters on backend " + backend->Name());
  }
  return m;
}

Model::~Model() {
  FreeActivations();
  if (scalars_) backend_->Free(scalars_);
  for (float* p : {params_, grads_, adam_m_, adam_v_, small_, block_scratch_, vocab_scratch_}) {
    if (p) backend_->Free(p);
  }
}

const char* WeightDtypeName(WeightDtype dtype) {
  switch (dtype) {
    case WeightDtype::kF32: return "f32";
    case WeightDtype::kBF16: return "bf16";
    case WeightDtype::kF16: return "f16";
  }
  return "?";
}

size_t Model::TensorIndex(size_t offset) const {
  for (size_t i = 0; i < tensors_.size(); ++i) {
    if (tensors_[i].offset == offset) return i;
  }
  return static_cast<size_t>(-1);
}

float* Model::Param(size_t offset) const {
  if (matrices_ == WeightDtype::kF32) return params_ + offset;
  const size_t i = TensorIndex(offset);
  return i < small_off_.size() && small_off_[i] != static_cast<size_t>(-1) ? small_ + small_off_[i] : nullptr;
}

void Model::Widen(const ParamTensor& t, float* out) const {
  const size_t i = static_cast<size_t>(&t - tensors_.data());
  const uint16_t* in = store16_.data() + store_off_[i];
  const int64_t n = static_cast<int64_t>(t.size);
  std::vector<float> host(t.size);
  if (matrices_ == WeightDtype::kBF16) {
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < n; ++k) host[k] = Bf16BitsToFloat(in[k]);
  } else {
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < n; ++k) host[k] = F16BitsToFloat(in[k]);
  }
  backend_->ToDevice(out, host.data(), t.size * sizeof(float));
}

std::vector<float> Model::TensorToHost(const ParamTensor& t) const {
  std::vector<float> host(t.size);
  if (Holds16(t)) {
    const size_t i = static_cast<size_t>(&t - tensors_.data());
    const uint16_t* in = store16_.data() + store_off_[i];
    for (size_t k = 0; k < t.size; ++k) {
      host[k] = matrices_ == WeightDtype::kBF16 ? Bf16BitsToFloat(in[k]) : F16BitsToFloat(in[k]);
    }
  } else {
    backend_->ToHost(host.data(), Param(t.offset), t.size * sizeof(float));
  }
  return host;
}

void Model::SetTensor(const ParamTensor& t, const float* values) {
  if (Holds16(t)) {
    std::vector<uint16_t> raw(t.size);
    for (size_t k = 0; k < t.size; ++k) {
      raw[k] = matrices_ == WeightDtype::kBF16 ? FloatToBf16Bits(values[k]) : FloatToF16Bits(values[k]);
    }
    SetTensor16(t, raw.data());
    return;
  }
  backend_->ToDevice(Param(t.offset), values, t.size * sizeof(float));
}

void Model::SetTensor16(const ParamTensor& t, const void* raw) {
  const size_t i = static_cast<size_t>(&t - tensors_.data());
  std::memcpy(store16_.data() + store_off_[i], raw, t.size * sizeof(uint16_t));
  scratch_block_ = -1;  // whatever was widened is stale now
  vocab_holds_ = static_cast<size_t>(-1);
}

double Model::ParameterBytes() const {
  if (matrices_ == WeightDtype::kF32) return 4.0 * slab_floats_;
  double small = 0;
  for (const ParamTensor& t : tensors_) small += t.shape.size() == 2 ? 0 : t.size;
  const ModelConfig& c = config_;
  const double block = static_cast<double>(c.q_dim()) * c.d_model * 2 + static_cast<double>(c.kv_dim()) * c.d_model * 2 +
                       static_cast<double>(c.ffn) * c.d_model * 3;
  return 2.0 * store16_.size() + 4.0 * (small + block + static_cast<double>(c.vocab) * c.d_model);
}

LayerParams Model::layer(int l) const {
  if (matrices_ == WeightDtype::kF32) return View(params_, l);
  const LayerOffsets& o = layer_off_[l];
  auto optional = [&](size_t off) { return off == LayerOffsets::kNone ? nullptr : Param(off); };
  LayerParams p{};
  p.attn_norm = Param(o.attn_norm);
  p.theta = Param(o.theta);
  p.bq = optional(o.bq);
  p.bk = optional(o.bk);
  p.bv = optional(o.bv);
  p.q_norm = optional(o.q_norm);
  p.k_norm = optional(o.k_norm);
  p.sinks = optional(o.sinks);
  p.mlp_norm = Param(o.mlp_norm);
  return p;
}

LayerParams Model::Block(int l) {
  if (matrices_ == WeightDtype::kF32) return View(params_, l);
  LayerParams p = layer(l);
  const LayerOffsets& o = layer_off_[l];
  float* next = block_scratch_;
  for (auto [off, slot] : {std::pair{o.wq, &p.wq}, {o.wk, &p.wk}, {o.wv, &p.wv}, {o.wo, &p.wo}, {o.w_gate, &p.w_gate},
                           {o.w_up, &p.w_up}, {o.w_down, &p.w_down}}) {
    const ParamTensor& t = tensors_[TensorIndex(off)];
    if (scratch_block_ != l) Widen(t, next);
    *slot = next;
    next += t.size;
  }
  scratch_block_ = l;
  return p;
}

const float* Model::Vocab(size_t offset) {
  if (matrices_ == WeightDtype::kF32) return params_ + offset;
  if (vocab_holds_ != offset) {
    Widen(tensors_[TensorIndex(offset)], vocab_scratch_);
    vocab_holds_ = offset;
  }
  return vocab_scratch_;
}

const ParamTensor* Model::FindTensor(const std::string& name) const {
  for (const auto& t : tensors_) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

double Model::VScaleCBase() const {
  return static_cast<double>(config_.d_model) * config_.head_dim * config_.VScaleSigma() * config_.VScaleSigma();
}

LayerParams Model::View(float* base, int l) const {
  const LayerOffsets& o = layer_off_[l];
  auto optional = [&](size_t off) { return off == LayerOffsets::kNone ? nullptr : base + off; };
  return {base + o.attn_norm, base + o.wq,       base + o.wk,       base + o.wv,       base + o.wo,
          base + o.theta,     optional(o.bq),    optional(o.bk),    optional(o.bv),    optional(o.q_norm),
          optional(o.k_norm), base + o.mlp_norm, base + o.w_gate, base + o.w_up, base + o.w_down,
          optional(o.sinks),  optional(o.gate_w)};
}

void Model::InitWeights(uint64_t seed) {
  std::vector<float> host(slab_floats_, 0.0f);
  Rng rng(Mix64(seed ^ 0x5EED5EEDull));
  for (const ParamTensor& t : tensors_) {
    float* p = host.data() + t.offset;
    if (t.shape.size() == 2) {
      for (size_t i = 0; i < t.size; ++i) p[i] = static_cast<float>(config_.init_std * rng.Normal());
    } else if (t.name.find("self_attn.sinks") != std::string::npos) {
      for (size_t i = 0; i < t.size; ++i) p[i] = static_cast<float>(config_.sink_logit_init);
    } else if (t.name.find("vscale_theta") != std::string::npos || t.name.find(".bias") != std::string::npos) {
      for (size_t i = 0; i < t.size; ++i) p[i] = 0.0f;
    } else {
      for (size_t i = 0; i < t.size; ++i) p[i] = 1.0f;  // RMSNorm gains
    }
  }
  ParamsFromHost(host);
  if (training()) {
    backend_->Fill(adam_m_, 0.0f, slab_floats_);
    backend_->Fill(adam_v_, 0.0f, slab_floats_);
  }
  ZeroGrad();
}

void Model::ZeroGrad() {
  if (training()) backend_->Fill(grads_, 0.0f, slab_floats_);
}

std::vector<float> Model::ParamsToHost() const {
  std::vector<float> host(slab_floats_);
  if (matrices_ != WeightDtype::kF32) {
    for (const ParamTensor& t : tensors_) {
      const std::vector<float> v = TensorToHost(t);
      std::copy(v.begin(), v.end(), host.begin() + static_cast<std::ptrdiff_t>(t.offset));
    }
    return host;
  }
  backend_->ToHost(host.data(), params_, slab_floats_ * sizeof(float));
  return host;
}

void Model::ParamsFromHost(const std::vector<float>& host) {
  if (matrices_ != WeightDtype::kF32) {
    for (const ParamTensor& t : tensors_) SetTensor(t, host.data() + t.offset);
    return;
  }
  backend_->ToDevice(params_, host.data(), slab_floats_ * sizeof(float));
}

std::vector<float> Model::GradsToHost() const {
  if (!training()) return {};
  std::vector<float> host(slab_floats_);
  backend_->ToHost(host.data(), grads_, slab_floats_ * sizeof(float));
  return host;
}

void Model::FreeActivations() {
  if (activations_ != nullptr) activations_->Release();
  residual_.clear();
  acts_.clear();
  if (tokens_dev_) backend_->Free(tokens_dev_);
  if (targets_dev_) backend_->Free(targets_dev_);
  tokens_dev_ = targets_dev_ = nullptr;
  d_q_raw_ = d_k_raw_ = dgamma_sink_ = d_gate_logits_ = d_y_raw_ = nullptr;
  xf_ = TensorView();
  act_B_ = act_T_ = 0;
}

Status Model::PrepareActivations(int B, int T) {
  if (B == act_B_ && T == act_T_) return OkStatus();
  FreeActivations();
  if (activations_ == nullptr) activations_ = std::make_unique<Arena>(backend_);
  const size_t N = static_cast<size_t>(B) * T;
  const size_t d = config_.d_model, F = config_.ffn, qd = config_.q_dim(), kvd = config_.kv_dim();
  // Every activation buffer of this batch shape planned first, then allocated at once:
  // (destination, handle) pairs resolved after the arena's one allocation. `act` buffers
  // are in the backend's activation dtype (the bf16 contract's list: norm outputs, q, k,
  // v and their projections, v̂, y, gate, up, SwiGLU's output); `alloc` ones are fp32.
  const DType dt = backend_->ActivationDType();
  std::vector<std::pair<float**, size_t>> pending;
  std::vector<std::pair<TensorView*, size_t>> pending_views;
  auto alloc = [&](float** dst, size_t n) { pending.emplace_back(dst, activations_->Reserve(DType::kF32, 1, n)); };
  auto act = [&](TensorView* dst, size_t n) { pending_views.emplace_back(dst, activations_->Reserve(dt, 1, n)); };
  residual_.assign(config_.layers + 1, nullptr);
  for (int l = 0; l <= config_.layers; ++l) alloc(&residual_[l], N * d);
  const int sets = recompute_ ? std::min(config_.layers, 1) : config_.layers;
  acts_.assign(sets, LayerActs{});  // sized once: the addresses below stay valid
  for (LayerActs& a : acts_) {
    act(&a.xn, N * d);
    alloc(&a.rstd_attn, N);
    act(&a.q, N * qd);
    act(&a.k, N * kvd);
    act(&a.v, N * kvd);
    act(&a.vhat, N * kvd);
    if (config_.attention == AttentionKind::kSoftmax) {
      alloc(&a.att_ws, backend_->AttentionWorkspaceFloats(B, T, config_.heads));
    } else {
      if (backend_->ArmAttentionKeepsWeights()) alloc(&a.att, static_cast<size_t>(B) * config_.heads * T * T);
      alloc(&a.unassigned, static_cast<size_t>(B) * config_.heads * T);
      alloc(&a.arm_ws, backend_->ArmAttentionWorkspaceFloats(B, T, config_.heads));
    }
    if (config_.gate != GateKind::kNone) alloc(&a.gate_logits, N * config_.GateRows());
    if (config_.gate == GateKind::kOutput || config_.gate == GateKind::kHead) act(&a.y_raw, N * qd);
    alloc(&a.lse, static_cast<size_t>(B) * config_.heads * T);
    act(&a.y, N * qd);
    alloc(&a.r_attn, N * d);
    alloc(&a.h_half, N * d);
    act(&a.xm, N * d);
    alloc(&a.rstd_mlp, N);
    act(&a.gate, N * F);
    act(&a.up, N * F);
    act(&a.act, N * F);
    alloc(&a.r_mlp, N * d);
    if (config_.qk_norm) {
      act(&a.q_raw, N * qd);
      act(&a.k_raw, N * kvd);
      alloc(&a.rstd_q, N * config_.heads);
      alloc(&a.rstd_k, N * config_.kv_heads);
    }
  }
  act(&xf_, N * d);
  alloc(&rstd_f_, N);
  // The LM head works in row chunks of at most the backend's LmHeadChunkLogits (64 MB on
  // a CPU, 512 MB on a GPU): a vocabulary of 152k never needs N·V floats.
  logits_rows_ =
      static_cast<int>(std::min<size_t>(N, std::max<size_t>(1, backend_->LmHeadChunkLogits() / config_.vocab)));
  alloc(&logits_, static_cast<size_t>(logits_rows_) * config_.vocab);
  alloc(&d_res_a_, N * d);
  alloc(&d_res_b_, N * d);
  alloc(&d_norm_, N * d);
  alloc(&d_q_, N * qd);
  alloc(&d_k_, N * kvd);
  alloc(&d_v_, N * kvd);
  alloc(&d_vhat_, N * kvd);
  alloc(&d_y_, N * qd);
  alloc(&d_act_, N * F);
  alloc(&d_gate_, N * F);
  alloc(&d_up_, N * F);
  if (!training()) alloc(&dgamma_sink_, std::max<size_t>(d, config_.head_dim));
  if (config_.gate != GateKind::kNone) alloc(&d_gate_logits_, N * config_.GateRows());
  if (config_.gate == GateKind::kOutput || config_.gate == GateKind::kHead) alloc(&d_y_raw_, N * qd);
  if (config_.qk_norm) {
    alloc(&d_q_raw_, N * qd);
    alloc(&d_k_raw_, N * kvd);
  }
  const Status committed = activations_->Commit("the activations of " + std::to_string(B) + " × " +
                                                std::to_string(T) + " tokens (" + std::to_string(config_.layers) +
                                                (recompute_ ? " layers, blocks recomputed)" : " layers)"));
  if (!committed.ok()) {
    activations_->Release();
    residual_.clear();
    acts_.clear();
    return committed;
  }
  for (auto& [dst, handle] : pending) *dst = activations_->View(handle).f32();
  for (auto& [dst, handle] : pending_views) *dst = activations_->View(handle);
  tokens_dev_ = backend_->AllocInt(N);
  targets_dev_ = backend_->AllocInt(N);
  if (tokens_dev_ == nullptr || targets_dev_ == nullptr) {
    FreeActivations();
    return Status(StatusCode::kResourceExhausted, "the token buffers of " + std::to_string(N) + " tokens");
  }
  act_B_ = B;
  act_T_ = T;
  return OkStatus();
}

double Model::ActivationBytes() const { return activations_ != nullptr ? static_cast<double>(activations_->bytes()) : 0; }

void Model::EnsureActivations(int B, int T) {
  const Status s = PrepareActivations(B, T);
  if (!s.ok()) {
    // The callers that can fail (the trainer, the diagnostic pass) prepared this shape
    // first and reported the error; reaching here means a pass of a shape that was not.
    std::fprintf(stderr, "sinkscope: %s\n", s.message().c_str());
    std::abort();
  }
}

Backend::AttentionShape Model::Shape(int B, int T) const {
  Backend::AttentionShape s;
  s.B = B;
  s.T = T;
  s.d = config_.d_model;
  s.H = config_.heads;
  s.KV = config_.kv_heads;
  s.dh = config_.head_dim;
  s.eps = static_cast<float>(config_.rms_eps);
  s.rope = &rotary_;
  s.vscale = config_.vscale;
  s.vscale_c_base = VScaleCBase();
  return s;
}

AttentionArmParams Model::ArmParams() const {
  AttentionArmParams p;
  p.kind = config_.attention;
  p.sigmoid_bias = static_cast<float>(config_.sigmoid_bias);
  p.softpick_eps = static_cast<float>(config_.softpick_eps);
  return p;
}

Backend::AttentionInputWeights Model::AttentionWeights(const LayerParams& w) {
  return {w.wq, w.wk, w.wv, w.bq, w.bk, w.bv, w.q_norm, w.k_norm, w.theta};
}

void Model::ForwardBlock(int l, const LayerParams& w, LayerActs& a, PassObserver* observer, int B, int T) {
  Backend& be = *backend_;
  const ModelConfig& c = config_;
  const int N = B * T, d = c.d_model, F = c.ffn, H = c.heads, KV = c.kv_heads, dh = c.head_dim;
  const int qd = c.q_dim();
  const float eps = static_cast<float>(c.rms_eps);
  const float* h_in = residual_[l];
  // Attention branch: x̃ = RMSNorm(h_in) is in a.xn.
  if (observer) observer->EditAttentionInput(l, a.xn, B, T);
  be.AttentionInputForward(Shape(B, T), a.xn, AttentionWeights(w),
                           {a.q, a.k, a.v, a.vhat, a.q_raw, a.k_raw, a.rstd_q, a.rstd_k});
  const int G = c.GateRows();
  if (c.gate != GateKind::kNone) be.Gemm(false, true, N, G, d, 1.0f, a.xn, w.gate_w, 0.0f, a.gate_logits);  // (N,G)
  if (c.gate == GateKind::kValue) be.SigmoidGateForward(a.vhat, a.v, a.gate_logits, N, G, 1);  // v' = v ⊙ σ(x̃W_gᵀ)
  const bool output_gate = c.gate == GateKind::kOutput || c.gate == GateKind::kHead;
  const TensorView y = output_gate ? a.y_raw : a.y;  // the attention output, before an output gate
  if (c.attention == AttentionKind::kSoftmax) {
    be.AttentionForward(y, a.lse, a.att_ws, a.q, a.k, a.vhat, B, T, H, KV, dh);  // (N,H·dh)
  } else {
    be.ArmAttentionForward(y, a.att, a.unassigned, a.arm_ws, a.q, a.k, a.vhat, w.sinks, B, T, H, KV, dh, ArmParams());
  }
  if (output_gate) be.SigmoidGateForward(a.y, a.y_raw, a.gate_logits, N, G, c.GateWidth());  // Y' = Y ⊙ σ(x̃W_gᵀ)
  be.Gemm(false, true, N, d, qd, 1.0f, a.y, w.wo, 0.0f, a.r_attn);              // r_attn (N,d)
  // h_half = h_in + r_attn; x̃_mlp = RMSNorm(h_half).
  be.ResidualRmsNormForward(a.h_half, a.xm, a.rstd_mlp, h_in, a.r_attn, w.mlp_norm, N, d, eps);
  // MLP branch.
  be.GateUpSwiGluForward(a.act, a.gate, a.up, a.xm, w.w_gate, w.w_up, N, F, d);
  be.Gemm(false, true, N, d, F, 1.0f, a.act, w.w_down, 0.0f, a.r_mlp);  // r_mlp (N,d)
}

void Model::Forward(const int32_t* tokens, int B, int T, PassObserver* observer) {
  EnsureActivations(B, T);
  Backend& be = *backend_;
  const ModelConfig& c = config_;
  const int N = B * T, d = c.d_model;
  const float eps = static_cast<float>(c.rms_eps);
  // With recompute_blocks every block uses the one set of insides.
  auto acts = [&](int l) -> LayerActs& { return acts_[recompute_ ? 0 : l]; };
  be.ToDevice(tokens_dev_, tokens, sizeof(int32_t) * N);
  be.EmbeddingForward(residual_[0], tokens_dev_, Vocab(off_embed_), N, d);  // (N,d)
  // Each residual add is fused with the norm that reads its sum: the first block's
  // input norm stands alone.
  if (c.layers > 0) {
    be.RmsNormForward(acts(0).xn, acts(0).rstd_attn, residual_[0], layer(0).attn_norm, N, d, eps);
  } else {
    be.RmsNormForward(xf_, rstd_f_, residual_[0], Param(off_final_norm_), N, d, eps);
  }
  for (int l = 0; l < c.layers; ++l) {
    const LayerParams w = Block(l);
    LayerActs& a = acts(l);
    const float* h_in = residual_[l];
    float* h_out = residual_[l + 1];
    ForwardBlock(l, w, a, observer, B, T);
    // h_out = h_half + r_mlp, and the norm of the next block (or the final norm).
    const bool last = l + 1 == c.layers;
    be.ResidualRmsNormForward(h_out, last ? xf_ : acts(l + 1).xn, last ? rstd_f_ : acts(l + 1).rstd_attn,
                              a.h_half, a.r_mlp, last ? Param(off_final_norm_) : layer(l + 1).attn_norm, N, d,
                              eps);
    if (observer) {
      observer->OnBlockForward(l,
                               {h_in, a.h_half, h_out, a.r_attn, a.r_mlp, a.q, a.k, a.v, a.vhat, a.lse, a.att,
                                a.unassigned, a.gate_logits, a.arm_ws},
                               B, T);
    }
  }
}

void Model::EvaluateInto(const int32_t* tokens, const int32_t* targets, int B, int T, double* loss_acc,
                         PassObserver* observer) {
  Forward(tokens, B, T, observer);
  const int N = B * T;
  backend_->ToDevice(targets_dev_, targets, sizeof(int32_t) * N);
  backend_->LmHeadLoss(logits_, logits_rows_, xf_, Vocab(off_head_), targets_dev_, N, config_.vocab,
                       config_.d_model, loss_acc);
}

double Model::Evaluate(const int32_t* tokens, const int32_t* targets, int B, int T, PassObserver* observer) {
  EnsureActivations(B, T);
  backend_->ZeroScalars(scalars_, 1);
  EvaluateInto(tokens, targets, B, T, scalars_, observer);
  double loss = 0;
  backend_->ReadScalars(&loss, scalars_, 1);
  return loss / (static_cast<double>(B) * T);
}

double Model::ForwardBackward(const int32_t* tokens, const int32_t* targets, int B, int T, float grad_scale,
                              PassObserver* observer) {
  EnsureActivations(B, T);
  backend_->ZeroScalars(scalars_, 1);
  ForwardBackwardInto(tokens, targets, B, T, grad_scale, scalars_, observer);
  double loss = 0;
  backend_->ReadScalars(&loss, scalars_, 1);
  return loss / (static_cast<double>(B) * T);
}

void Model::ForwardBackwardInto(const int32_t* tokens, const int32_t* targets, int B, int T, float grad_scale,
                                double* loss_acc, PassObserver* observer, const GradientsReady* ready) {
  Forward(tokens, B, T, observer);
  Backend& be = *backend_;
  const ModelConfig& c = config_;
  const int N = B * T, d = c.d_model, F = c.ffn, H = c.heads, KV = c.kv_heads, dh = c.head_dim, V = c.vocab;
  const int qd = c.q_dim();
  const size_t Nd = static_cast<size_t>(N) * d;
  const Backend::AttentionShape shape = Shape(B, T);
  be.ToDevice(targets_dev_, targets, sizeof(int32_t) * N);
  // Probing only: the gradients of activations, not of parameters (the gains' go to a sink).
  const bool pg = training();
  auto gain_grad = [&](float* g) { return pg ? g : dgamma_sink_; };

  // LM head with the loss (∂L/∂xf into d_norm_), then the final norm.
  be.LmHeadCrossEntropy(d_norm_, pg ? grads_ + off_head_ : nullptr, logits_, logits_rows_, xf_, Vocab(off_head_),
                        targets_dev_, N, V, d, grad_scale, loss_acc);
  be.Fill(d_res_a_, 0.0f, Nd);
  be.RmsNormBackward(d_res_a_, gain_grad(grads_ + off_final_norm_), d_norm_, residual_[c.layers],
                     Param(off_final_norm_), rstd_f_, N, d);
  const bool tell = pg && ready != nullptr;
  auto layer_begin = [&](int l) { return l < c.layers ? layer_off_[l].attn_norm : off_final_norm_; };
  if (tell) (*ready)(off_final_norm_, slab_floats_);  // the final norm (and an untied LM head)
  // d_res_a_ holds ∂L/∂h_out of the last block; the two residual buffers alternate.
  float* d_out = d_res_a_;
  float* d_half = d_res_b_;
  for (int l = c.layers - 1; l >= 0; --l) {
    const LayerParams w = Block(l);
    const LayerParams gw = pg ? layer_grad(l) : LayerParams{};
    LayerActs& a = acts_[recompute_ ? 0 : l];
    if (recompute_ && l + 1 < c.layers) {
      // The insides hold a later block's: this block's forward again, from its input (the
      // last block's are still there). The observer edits x̃ again but does not measure.
      be.RmsNormForward(a.xn, a.rstd_attn, residual_[l], w.attn_norm, N, d, static_cast<float>(c.rms_eps));
      ForwardBlock(l, w, a, observer, B, T);
    }
    if (observer) observer->OnGradient(l, Site::kHOut, d_out, nullptr, B, T);
    // MLP branch: r_mlp = W_down (silu(W_gate x̃_mlp) ⊙ W_up x̃_mlp).
    be.Gemm(false, false, N, F, d, 1.0f, d_out, w.w_down, 0.0f, d_act_);         // (N,F)
    if (pg) be.Gemm(true, false, d, F, N, 1.0f, d_out, a.act, 1.0f, gw.w_down);  // (d,F)
    be.GateUpSwiGluBackward(d_norm_, gw.w_gate, gw.w_up, d_gate_, d_up_, d_act_, a.gate, a.up, a.xm, w.w_gate,
                            w.w_up, N, F, d);  // ∂L/∂x̃_mlp
    if (observer) observer->OnGradient(l, Site::kXm, d_norm_, nullptr, B, T);
    // The residual path plus J_rmsᵀ ∂L/∂x̃_mlp.
    be.RmsNormBackwardResidual(d_half, gain_grad(gw.mlp_norm), d_out, d_norm_, a.h_half, w.mlp_norm, a.rstd_mlp, N,
                               d);
    if (observer) observer->OnGradient(l, Site::kHHalf, d_half, d_out, B, T);

    // Attention branch.
    be.Gemm(false, false, N, qd, d, 1.0f, d_half, w.wo, 0.0f, d_y_);  // ∂L/∂y (N,H·dh)
    if (pg) be.Gemm(true, false, d, qd, N, 1.0f, d_half, a.y, 1.0f, gw.wo);
    const int G = c.GateRows();
    const bool output_gate = c.gate == GateKind::kOutput || c.gate == GateKind::kHead;
    if (output_gate) {  // y = y_raw ⊙ σ(x̃W_gᵀ): ∂L/∂y_raw and ∂L/∂(x̃W_gᵀ)
      be.SigmoidGateBackward(d_y_raw_, d_gate_logits_, d_y_, a.y_raw, a.gate_logits, N, G, c.GateWidth());
    }
    const float* d_y_att = output_gate ? d_y_raw_ : d_y_;
    const TensorView y_att = output_gate ? a.y_raw : a.y;
    if (c.attention == AttentionKind::kSoftmax) {
      be.AttentionBackward(d_q_, d_k_, d_vhat_, d_y_att, y_att, a.lse, a.att_ws, a.q, a.k, a.vhat, B, T, H, KV, dh);
    } else {
      be.ArmAttentionBackward(d_q_, d_k_, d_vhat_, pg ? gw.sinks : nullptr, d_y_att, y_att, a.att, a.unassigned,
                              a.arm_ws, a.q, a.k, a.vhat, w.sinks, B, T, H, KV, dh, ArmParams());
    }
    if (c.gate == GateKind::kValue) {  // v' = v ⊙ σ(x̃W_gᵀ) (no V-scale: Validate refuses the pair)
      be.SigmoidGateBackward(d_v_, d_gate_logits_, d_vhat_, a.v, a.gate_logits, N, G, 1);
    } else {
      be.VScaleBackward(d_v_, pg && c.vscale == VScaleMode::kVScale ? gw.theta : nullptr, d_vhat_, a.v, w.theta, N,
                        KV, dh, VScaleCBase(), c.vscale);
    }
    if (observer) {
      observer->OnGradient(l, Site::kQ, d_q_, nullptr, B, T);
      observer->OnGradient(l, Site::kK, d_k_, nullptr, B, T);
      observer->OnGradient(l, Site::kVHat, d_vhat_, nullptr, B, T);
      observer->OnGradient(l, Site::kV, d_v_, nullptr, B, T);
    }
    Backend::AttentionInputGrads g;
    if (pg) g = {gw.wq, gw.wk, gw.wv, gw.bq, gw.bk, gw.bv, gw.q_norm, gw.k_norm};
    if (c.qk_norm && !pg) g.q_norm = g.k_norm = dgamma_sink_;
    be.AttentionInputBackward(shape, d_norm_, d_q_, d_k_, d_v_, a.xn, AttentionWeights(w),
                              {a.q, a.k, a.v, a.vhat, a.q_raw, a.k_raw, a.rstd_q, a.rstd_k}, g, d_q_raw_, d_k_raw_);
    if (c.gate != GateKind::kNone) {  // the gate's path to x̃ and W_g
      be.Gemm(false, false, N, d, G, 1.0f, d_gate_logits_, w.gate_w, 1.0f, d_norm_);             // (N,d)
      if (pg) be.Gemm(true, false, G, d, N, 1.0f, d_gate_logits_, a.xn, 1.0f, gw.gate_w);  // (G,d)
    }
    if (observer) observer->OnGradient(l, Site::kXn, d_norm_, nullptr, B, T);
    float* d_in = d_out;  // ∂L/∂h_out is no longer needed: reuse its buffer
    be.RmsNormBackwardResidual(d_in, gain_grad(gw.attn_norm), d_half, d_norm_, residual_[l], w.attn_norm,
                               a.rstd_attn, N, d);
    if (observer) observer->OnGradient(l, Site::kHIn, d_in, d_half, B, T);
    d_out = d_in;  // ∂L/∂h_in of block l is ∂L/∂h_out of block l−1
    d_half = (d_out == d_res_a_) ? d_res_b_ : d_res_a_;
    if (tell) (*ready)(layer_begin(l), layer_begin(l + 1));
  }
  if (pg) be.EmbeddingBackward(grads_ + off_embed_, d_out, tokens_dev_, N, d);
  if (tell) (*ready)(off_embed_, layer_begin(0));  // the embedding (and a tied LM head)
}

}  // namespace sinkscope
