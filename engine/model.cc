#include "engine/model.h"

#include <algorithm>
#include <cmath>

#include "base/rng.h"

namespace sinkscope {

Model::Model(const ModelConfig& config, Backend* backend)
    : config_(config), rotary_(config.Rotary()), backend_(backend) {}

StatusOr<std::unique_ptr<Model>> Model::Create(const ModelConfig& config, Backend* backend, ModelOptions options) {
  RETURN_IF_ERROR(config.Validate());
  std::unique_ptr<Model> m(new Model(config, backend));
  const int64_t d = config.d_model, V = config.vocab, F = config.ffn;
  const int64_t qd = config.q_dim(), kvd = config.kv_dim();
  size_t offset = 0;
  auto add = [&](std::string name, std::vector<int64_t> shape, bool decay, bool trainable = true) {
    size_t n = 1;
    for (int64_t s : shape) n *= static_cast<size_t>(s);
    m->tensors_.push_back({std::move(name), std::move(shape), offset, n, decay, trainable});
    const size_t at = offset;
    offset += n;
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
    o.mlp_norm = add(p + "post_attention_layernorm.weight", {d}, false);
    o.w_gate = add(p + "mlp.gate_proj.weight", {F, d}, true);
    o.w_up = add(p + "mlp.up_proj.weight", {F, d}, true);
    o.w_down = add(p + "mlp.down_proj.weight", {d, F}, true);
    m->layer_off_.push_back(o);
  }
  m->off_final_norm_ = add("model.norm.weight", {d}, false);
  m->off_head_ = config.tied_embeddings ? m->off_embed_ : add("lm_head.weight", {V, d}, true);
  m->num_params_ = offset;
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
  for (float* p : {params_, grads_, adam_m_, adam_v_}) {
    if (p) backend_->Free(p);
  }
}

const ParamTensor* Model::FindTensor(const std::string& name) const {
  for (const auto& t : tensors_) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

double Model::VScaleCBase() const {
  return static_cast<double>(config_.d_model) * config_.head_dim * config_.vscale_sigma * config_.vscale_sigma;
}

LayerParams Model::View(float* base, int l) const {
  const LayerOffsets& o = layer_off_[l];
  auto optional = [&](size_t off) { return off == LayerOffsets::kNone ? nullptr : base + off; };
  return {base + o.attn_norm, base + o.wq,       base + o.wk,       base + o.wv,       base + o.wo,
          base + o.theta,     optional(o.bq),    optional(o.bk),    optional(o.bv),    optional(o.q_norm),
          optional(o.k_norm), base + o.mlp_norm, base + o.w_gate, base + o.w_up, base + o.w_down};
}

void Model::InitWeights(uint64_t seed) {
  std::vector<float> host(num_params_, 0.0f);
  Rng rng(Mix64(seed ^ 0x5EED5EEDull));
  for (const ParamTensor& t : tensors_) {
    float* p = host.data() + t.offset;
    if (t.shape.size() == 2) {
      for (size_t i = 0; i < t.size; ++i) p[i] = static_cast<float>(config_.init_std * rng.Normal());
    } else if (t.name.find("vscale_theta") != std::string::npos || t.name.find(".bias") != std::string::npos) {
      for (size_t i = 0; i < t.size; ++i) p[i] = 0.0f;
    } else {
      for (size_t i = 0; i < t.size; ++i) p[i] = 1.0f;  // RMSNorm gains
    }
  }
  ParamsFromHost(host);
  if (training()) {
    backend_->Fill(adam_m_, 0.0f, num_params_);
    backend_->Fill(adam_v_, 0.0f, num_params_);
  }
  ZeroGrad();
}

void Model::ZeroGrad() {
  if (training()) backend_->Fill(grads_, 0.0f, num_params_);
}

std::vector<float> Model::ParamsToHost() const {
  std::vector<float> host(num_params_);
  backend_->ToHost(host.data(), params_, num_params_ * sizeof(float));
  return host;
}

void Model::ParamsFromHost(const std::vector<float>& host) {
  backend_->ToDevice(params_, host.data(), num_params_ * sizeof(float));
}

std::vector<float> Model::GradsToHost() const {
  if (!training()) return {};
  std::vector<float> host(num_params_);
  backend_->ToHost(host.data(), grads_, num_params_ * sizeof(float));
  return host;
}

void Model::FreeActivations() {
  for (void* p : owned_) backend_->Free(p);
  owned_.clear();
  residual_.clear();
  acts_.clear();
  if (tokens_dev_) backend_->Free(tokens_dev_);
  if (targets_dev_) backend_->Free(targets_dev_);
  tokens_dev_ = targets_dev_ = nullptr;
  ones_ = d_q_raw_ = d_k_raw_ = dgamma_sink_ = nullptr;
  act_B_ = act_T_ = 0;
}

void Model::EnsureActivations(int B, int T) {
  if (B == act_B_ && T == act_T_) return;
  FreeActivations();
  const size_t N = static_cast<size_t>(B) * T;
  const size_t d = config_.d_model, F = config_.ffn, qd = config_.q_dim(), kvd = config_.kv_dim();
  auto alloc = [&](size_t n) {
    float* p = backend_->Alloc(n);
    owned_.push_back(p);
    return p;
  };
  for (int l = 0; l <= config_.layers; ++l) residual_.push_back(alloc(N * d));
  for (int l = 0; l < config_.layers; ++l) {
    LayerActs a{};
    a.xn = alloc(N * d);
    a.rstd_attn = alloc(N);
    a.q = alloc(N * qd);
    a.k = alloc(N * kvd);
    a.v = alloc(N * kvd);
    a.vhat = alloc(N * kvd);
    a.att_ws = alloc(backend_->AttentionWorkspaceFloats(B, T, config_.heads));
    a.y = alloc(N * qd);
    a.r_attn = alloc(N * d);
    a.h_half = alloc(N * d);
    a.xm = alloc(N * d);
    a.rstd_mlp = alloc(N);
    a.gate = alloc(N * F);
    a.up = alloc(N * F);
    a.act = alloc(N * F);
    a.r_mlp = alloc(N * d);
    if (config_.qk_norm) {
      a.q_raw = alloc(N * qd);
      a.k_raw = alloc(N * kvd);
      a.rstd_q = alloc(N * config_.heads);
      a.rstd_k = alloc(N * config_.kv_heads);
    }
    acts_.push_back(a);
  }
  xf_ = alloc(N * d);
  rstd_f_ = alloc(N);
  logits_ = alloc(N * config_.vocab);
  d_res_a_ = alloc(N * d);
  d_res_b_ = alloc(N * d);
  d_norm_ = alloc(N * d);
  d_q_ = alloc(N * qd);
  d_k_ = alloc(N * kvd);
  d_v_ = alloc(N * kvd);
  d_vhat_ = alloc(N * kvd);
  d_y_ = alloc(N * qd);
  d_act_ = alloc(N * F);
  d_gate_ = alloc(N * F);
  d_up_ = alloc(N * F);
  if (config_.attention_bias) {
    ones_ = alloc(N);
    backend_->Fill(ones_, 1.0f, N);
  }
  if (!training()) dgamma_sink_ = alloc(std::max<size_t>(d, config_.head_dim));
  if (config_.qk_norm) {
    d_q_raw_ = alloc(N * qd);
    d_k_raw_ = alloc(N * kvd);
  }
  tokens_dev_ = backend_->AllocInt(N);
  targets_dev_ = backend_->AllocInt(N);
  act_B_ = B;
  act_T_ = T;
}

void Model::Forward(const int32_t* tokens, int B, int T, PassObserver* observer) {
  EnsureActivations(B, T);
  Backend& be = *backend_;
  const ModelConfig& c = config_;
  const int N = B * T, d = c.d_model, F = c.ffn, H = c.heads, KV = c.kv_heads, dh = c.head_dim;
  const int qd = c.q_dim(), kvd = c.kv_dim();
  const float eps = static_cast<float>(c.rms_eps);
  be.ToDevice(tokens_dev_, tokens, sizeof(int32_t) * N);
  be.EmbeddingForward(residual_[0], tokens_dev_, params_ + off_embed_, N, d);  // (N,d)
  for (int l = 0; l < c.layers; ++l) {
    const LayerParams w = layer(l);
    LayerActs& a = acts_[l];
    const float* h_in = residual_[l];
    float* h_out = residual_[l + 1];
    // Attention branch.
    be.RmsNormForward(a.xn, a.rstd_attn, h_in, w.attn_norm, N, d, eps);  // x̃ (N,d)
    if (observer) observer->EditAttentionInput(l, a.xn, B, T);
    float* q_proj = c.qk_norm ? a.q_raw : a.q;
    float* k_proj = c.qk_norm ? a.k_raw : a.k;
    be.Gemm(false, true, N, qd, d, 1.0f, a.xn, w.wq, 0.0f, q_proj);      // (N,H·dh)
    be.Gemm(false, true, N, kvd, d, 1.0f, a.xn, w.wk, 0.0f, k_proj);     // (N,KV·dh)
    be.Gemm(false, true, N, kvd, d, 1.0f, a.xn, w.wv, 0.0f, a.v);        // (N,KV·dh)
    if (c.attention_bias) {  // + b per row: ones(N,1)·b(1,·)
      be.Gemm(false, false, N, qd, 1, 1.0f, ones_, w.bq, 1.0f, q_proj);
      be.Gemm(false, false, N, kvd, 1, 1.0f, ones_, w.bk, 1.0f, k_proj);
      be.Gemm(false, false, N, kvd, 1, 1.0f, ones_, w.bv, 1.0f, a.v);
    }
    if (c.qk_norm) {  // each head's q and k normalised over dh, before RoPE (rows = N·heads)
      be.RmsNormForward(a.q, a.rstd_q, a.q_raw, w.q_norm, N * H, dh, eps);
      be.RmsNormForward(a.k, a.rstd_k, a.k_raw, w.k_norm, N * KV, dh, eps);
    }
    be.RopeForward(a.q, B, T, H, dh, rotary_);
    be.RopeForward(a.k, B, T, KV, dh, rotary_);
    be.VScaleForward(a.vhat, a.v, w.theta, N, KV, dh, VScaleCBase(), c.vscale);
    be.AttentionForward(a.y, a.att_ws, a.q, a.k, a.vhat, B, T, H, KV, dh);  // (N,H·dh)
    be.Gemm(false, true, N, d, qd, 1.0f, a.y, w.wo, 0.0f, a.r_attn);      // r_attn (N,d)
    be.Copy(a.h_half, h_in, static_cast<size_t>(N) * d);
    be.Axpy(a.h_half, 1.0f, a.r_attn, static_cast<size_t>(N) * d);  // h_half = h_in + r_attn
    // MLP branch.
    be.RmsNormForward(a.xm, a.rstd_mlp, a.h_half, w.mlp_norm, N, d, eps);  // x̃_mlp
    be.Gemm(false, true, N, F, d, 1.0f, a.xm, w.w_gate, 0.0f, a.gate);    // (N,F)
    be.Gemm(false, true, N, F, d, 1.0f, a.xm, w.w_up, 0.0f, a.up);        // (N,F)
    be.SwiGluForward(a.act, a.gate, a.up, N, F);
    be.Gemm(false, true, N, d, F, 1.0f, a.act, w.w_down, 0.0f, a.r_mlp);  // r_mlp (N,d)
    be.Copy(h_out, a.h_half, static_cast<size_t>(N) * d);
    be.Axpy(h_out, 1.0f, a.r_mlp, static_cast<size_t>(N) * d);  // h_out = h_half + r_mlp
    if (observer) {
      observer->OnBlockForward(l, {h_in, a.h_half, h_out, a.r_attn, a.r_mlp, a.q, a.k, a.v, a.vhat}, B, T);
    }
  }
  be.RmsNormForward(xf_, rstd_f_, residual_[c.layers], params_ + off_final_norm_, N, d, eps);
  be.Gemm(false, true, N, c.vocab, d, 1.0f, xf_, params_ + off_head_, 0.0f, logits_);  // (N,V)
}

double Model::Evaluate(const int32_t* tokens, const int32_t* targets, int B, int T, PassObserver* observer) {
  Forward(tokens, B, T, observer);
  const int N = B * T;
  backend_->ToDevice(targets_dev_, targets, sizeof(int32_t) * N);
  return backend_->CrossEntropyLoss(logits_, targets_dev_, N, config_.vocab) / N;
}

double Model::ForwardBackward(const int32_t* tokens, const int32_t* targets, int B, int T, float grad_scale,
                              PassObserver* observer) {
  Forward(tokens, B, T, observer);
  Backend& be = *backend_;
  const ModelConfig& c = config_;
  const int N = B * T, d = c.d_model, F = c.ffn, H = c.heads, KV = c.kv_heads, dh = c.head_dim, V = c.vocab;
  const int qd = c.q_dim(), kvd = c.kv_dim();
  const size_t Nd = static_cast<size_t>(N) * d;
  be.ToDevice(targets_dev_, targets, sizeof(int32_t) * N);
  const double loss_sum = be.CrossEntropyForwardBackward(logits_, targets_dev_, N, V, grad_scale);
  float* dlogits = logits_;  // (N,V), overwritten in place
  // Probing only: the gradients of activations, not of parameters (the gains' go to a sink).
  const bool pg = training();
  auto gain_grad = [&](float* g) { return pg ? g : dgamma_sink_; };

  // LM head and final norm.
  be.Gemm(false, false, N, d, V, 1.0f, dlogits, params_ + off_head_, 0.0f, d_norm_);    // dxf (N,d)
  if (pg) be.Gemm(true, false, V, d, N, 1.0f, dlogits, xf_, 1.0f, grads_ + off_head_);  // dW_head += dlogitsᵀ xf
  be.Fill(d_res_a_, 0.0f, Nd);
  be.RmsNormBackward(d_res_a_, gain_grad(grads_ + off_final_norm_), d_norm_, residual_[c.layers],
                     params_ + off_final_norm_, rstd_f_, N, d);
  // d_res_a_ holds ∂L/∂h_out of the last block; the two residual buffers alternate.
  float* d_out = d_res_a_;
  float* d_half = d_res_b_;
  for (int l = c.layers - 1; l >= 0; --l) {
    const LayerParams w = layer(l);
    const LayerParams gw = pg ? layer_grad(l) : LayerParams{};
    LayerActs& a = acts_[l];
    if (observer) observer->OnGradient(l, Site::kHOut, d_out, nullptr, B, T);
    // MLP branch: r_mlp = W_down (silu(W_gate x̃_mlp) ⊙ W_up x̃_mlp).
    be.Gemm(false, false, N, F, d, 1.0f, d_out, w.w_down, 0.0f, d_act_);      // (N,F)
    if (pg) be.Gemm(true, false, d, F, N, 1.0f, d_out, a.act, 1.0f, gw.w_down);  // (d,F)
    be.SwiGluBackward(d_gate_, d_up_, d_act_, a.gate, a.up, N, F);
    be.Gemm(false, false, N, d, F, 1.0f, d_gate_, w.w_gate, 0.0f, d_norm_);   // ∂L/∂x̃_mlp
    be.Gemm(false, false, N, d, F, 1.0f, d_up_, w.w_up, 1.0f, d_norm_);
    if (pg) {
      be.Gemm(true, false, F, d, N, 1.0f, d_gate_, a.xm, 1.0f, gw.w_gate);
      be.Gemm(true, false, F, d, N, 1.0f, d_up_, a.xm, 1.0f, gw.w_up);
    }
    if (observer) observer->OnGradient(l, Site::kXm, d_norm_, nullptr, B, T);
    be.Copy(d_half, d_out, Nd);  // residual path, then + J_rmsᵀ ∂L/∂x̃_mlp
    be.RmsNormBackward(d_half, gain_grad(gw.mlp_norm), d_norm_, a.h_half, w.mlp_norm, a.rstd_mlp, N, d);
    if (observer) observer->OnGradient(l, Site::kHHalf, d_half, d_out, B, T);

    // Attention branch.
    be.Gemm(false, false, N, qd, d, 1.0f, d_half, w.wo, 0.0f, d_y_);  // ∂L/∂y (N,H·dh)
    if (pg) be.Gemm(true, false, d, qd, N, 1.0f, d_half, a.y, 1.0f, gw.wo);
    be.AttentionBackward(d_q_, d_k_, d_vhat_, d_y_, a.att_ws, a.q, a.k, a.vhat, B, T, H, KV, dh);
    be.VScaleBackward(d_v_, pg && c.vscale == VScaleMode::kVScale ? gw.theta : nullptr, d_vhat_, a.v, w.theta, N, KV,
                      dh, VScaleCBase(), c.vscale);
    if (observer) {
      observer->OnGradient(l, Site::kQ, d_q_, nullptr, B, T);
      observer->OnGradient(l, Site::kK, d_k_, nullptr, B, T);
      observer->OnGradient(l, Site::kVHat, d_vhat_, nullptr, B, T);
      observer->OnGradient(l, Site::kV, d_v_, nullptr, B, T);
    }
    be.RopeBackward(d_q_, B, T, H, dh, rotary_);
    be.RopeBackward(d_k_, B, T, KV, dh, rotary_);
    float* dq_proj = d_q_;  // ∂L/∂(W_q x̃ + b_q)
    float* dk_proj = d_k_;
    if (c.qk_norm) {
      be.Fill(d_q_raw_, 0.0f, static_cast<size_t>(N) * qd);  // RmsNormBackward accumulates
      be.Fill(d_k_raw_, 0.0f, static_cast<size_t>(N) * kvd);
      be.RmsNormBackward(d_q_raw_, gain_grad(gw.q_norm), d_q_, a.q_raw, w.q_norm, a.rstd_q, N * H, dh);
      be.RmsNormBackward(d_k_raw_, gain_grad(gw.k_norm), d_k_, a.k_raw, w.k_norm, a.rstd_k, N * KV, dh);
      dq_proj = d_q_raw_;
      dk_proj = d_k_raw_;
    }
    if (pg && c.attention_bias) {  // ∂b = Σ_rows: ones(1,N)·∂(N,·)
      be.Gemm(true, false, 1, qd, N, 1.0f, ones_, dq_proj, 1.0f, gw.bq);
      be.Gemm(true, false, 1, kvd, N, 1.0f, ones_, dk_proj, 1.0f, gw.bk);
      be.Gemm(true, false, 1, kvd, N, 1.0f, ones_, d_v_, 1.0f, gw.bv);
    }
    be.Gemm(false, false, N, d, qd, 1.0f, dq_proj, w.wq, 0.0f, d_norm_);  // ∂L/∂x̃ (N,d)
    be.Gemm(false, false, N, d, kvd, 1.0f, dk_proj, w.wk, 1.0f, d_norm_);
    be.Gemm(false, false, N, d, kvd, 1.0f, d_v_, w.wv, 1.0f, d_norm_);
    if (pg) {
      be.Gemm(true, false, qd, d, N, 1.0f, dq_proj, a.xn, 1.0f, gw.wq);
      be.Gemm(true, false, kvd, d, N, 1.0f, dk_proj, a.xn, 1.0f, gw.wk);
      be.Gemm(true, false, kvd, d, N, 1.0f, d_v_, a.xn, 1.0f, gw.wv);
    }
    if (observer) observer->OnGradient(l, Site::kXn, d_norm_, nullptr, B, T);
    float* d_in = d_out;  // ∂L/∂h_out is no longer needed: reuse its buffer
    be.Copy(d_in, d_half, Nd);
    be.RmsNormBackward(d_in, gain_grad(gw.attn_norm), d_norm_, residual_[l], w.attn_norm, a.rstd_attn, N, d);
    if (observer) observer->OnGradient(l, Site::kHIn, d_in, d_half, B, T);
    d_out = d_in;  // ∂L/∂h_in of block l is ∂L/∂h_out of block l−1
    d_half = (d_out == d_res_a_) ? d_res_b_ : d_res_a_;
  }
  if (pg) be.EmbeddingBackward(grads_ + off_embed_, d_out, tokens_dev_, N, d);
  return loss_sum / N;
}

}  // namespace sinkscope
