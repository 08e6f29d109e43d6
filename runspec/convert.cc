#include "runspec/convert.h"

#include "proto/sinkscope/v1/experiment.pb.h"

namespace sinkscope {

DataSpec ToDataSpec(const v1::Experiment& e) {
  DataSpec spec;
  spec.val_fraction = e.data().val_fraction();
  spec.seq_len = e.model().context();
  spec.bos = e.data().bos() ? e.data().bos_token() : -1;
  if (e.data().has_text()) {
    spec.text.paths.assign(e.data().text().paths().begin(), e.data().text().paths().end());
    spec.text.separator = e.data().text().separator();
    spec.text.exclude_suffixes.assign(e.data().text().exclude_suffixes().begin(),
                                      e.data().text().exclude_suffixes().end());
  } else {
    spec.train_shards = e.data().shards().train();
    spec.val_shards = e.data().shards().val();
  }
  return spec;
}

TrainerOptions ToTrainerOptions(const v1::Experiment& e, v1::Arm arm, uint64_t seed, double peak_flops) {
  TrainerOptions o;
  o.model = ToModelConfig(e.model(), arm);
  o.optimizer = ToOptimizerConfig(e.train());
  o.micro_batch = e.train().micro_batch();
  o.grad_accum = e.train().grad_accum();
  o.eval_batches = e.train().eval_batches();
  o.seed = seed;
  o.peak_flops = peak_flops;
  return o;
}


bool ExperimentHasAttentionArm(const v1::Experiment& e) {
  for (int a : e.arms()) {
    if (ToModelConfig(e.model(), static_cast<v1::Arm>(a)).HasAttentionArm()) return true;
  }
  return false;
}

RunLoopOptions ToRunLoopOptions(const v1::Experiment& e, v1::Arm arm, uint64_t seed, double peak_flops,
                                const std::string& dir, bool resume) {
  RunLoopOptions o;
  o.trainer = ToTrainerOptions(e, arm, seed, peak_flops);
  o.dir = dir;
  o.total_steps = e.train().steps();
  o.probe_every = e.probe().every();
  o.probe = ToProbeSettings(e.probe());
  o.probe_batch = ToProbeBatchKind(e.probe());
  o.eval_every = e.train().eval_every();
  o.checkpoint_every = e.checkpoint().every();
  o.export_hf = e.checkpoint().export_hf();
  o.resume = resume;
  return o;
}

v1::ProbeReport ToProto(const ProbeReport& r) {
  v1::ProbeReport p;
  p.set_version(r.version);
  p.set_step(r.step);
  p.set_loss(r.loss);
  p.set_batch_sequences(r.batch_sequences);
  p.set_seq_len(r.seq_len);
  p.set_r_gs_median(r.r_gs_median);
  p.set_r_gs_q1(r.r_gs_q1);
  p.set_r_gs_q3(r.r_gs_q3);
  auto put = [](const std::vector<double>& v, google::protobuf::RepeatedField<double>* out) {
    out->Add(v.begin(), v.end());
  };
  for (const LayerProbe& l : r.layers) {
    v1::LayerProbe* x = p.add_layers();
    x->set_layer(l.layer);
    x->set_r_gs(l.r_gs);
    x->set_r_gs_sum_then_norm(l.r_gs_sum_then_norm);
    x->set_r_gs_norm_then_mean(l.r_gs_norm_then_mean);
    for (const auto& [name, values] : l.grad_profile) put(values, (*x->mutable_grad_profile())[name].mutable_values());
    put(l.attn_bloat, x->mutable_attn_bloat());
    put(l.attn_change, x->mutable_attn_change());
    put(l.attn_compress, x->mutable_attn_compress());
    put(l.mlp_bloat, x->mutable_mlp_bloat());
    put(l.mlp_change, x->mutable_mlp_change());
    put(l.mlp_compress, x->mutable_mlp_compress());
    put(l.alpha, x->mutable_alpha());
    put(l.column_mass, x->mutable_column_mass());
    put(l.column_second_moment, x->mutable_column_second_moment());
    put(l.per_sample_sink_fraction, x->mutable_per_sample_sink_fraction());
    x->set_sink_rate(l.sink_rate);
    x->set_sink_rate_per_sample(l.sink_rate_per_sample);
    for (const auto& [name, values] : l.norms) put(values, (*x->mutable_norms())[name].mutable_values());
    for (const auto& [name, value] : l.norm_ratio) (*x->mutable_norm_ratio())[name] = value;
    v1::MassiveActivations* m = x->mutable_massive();
    for (double v : l.massive.top3) m->add_top3(v);
    m->set_median(l.massive.median);
    m->set_top1_over_median(l.massive.top1_over_median);
    m->set_top1_sequence(l.massive.top1_sequence);
    m->set_top1_token(l.massive.top1_token);
    m->set_top1_channel(l.massive.top1_channel);
    put(l.theta, x->mutable_theta());
    put(l.c, x->mutable_c());
    put(l.unassigned_mass, x->mutable_unassigned_mass());
    put(l.gate_mean, x->mutable_gate_mean());
    put(l.gate_sink, x->mutable_gate_sink());
    put(l.gate_rest, x->mutable_gate_rest());
  }
  return p;
}

ProbeBatchKind ToProbeBatchKind(const v1::ProbeSpec& p) {
  return p.batch() == v1::HELD_OUT ? ProbeBatchKind::kHeldOut : ProbeBatchKind::kStepBatch;
}

ProbeSettings ToProbeSettings(const v1::ProbeSpec& p) {
  ProbeSettings s;
  s.sink_position = p.sink_position();
  s.ref_span = p.ref_span();
  s.profile_len = p.profile_len();
  s.eps = p.eps();
  s.t_eps = p.t_eps();
  s.reduce = p.reduce() == v1::NORM_THEN_MEAN ? ReduceMode::kNormThenMean : ReduceMode::kSumThenNorm;
  return s;
}

}  // namespace sinkscope
