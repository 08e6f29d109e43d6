// The small model the engine tests train and compare across backends: 2 layers, d 32,
// 4 query heads over 2 KV heads of 8 (GQA), SwiGLU 64; the vocabulary, context and arm
// are each test's own.
#pragma once

#include "engine/config.h"

namespace sinkscope {

inline ModelConfig SmallModel(int vocab, int context, VScaleMode vscale = VScaleMode::kNone) {
  ModelConfig c;
  c.layers = 2;
  c.d_model = 32;
  c.heads = 4;
  c.kv_heads = 2;
  c.head_dim = 8;
  c.ffn = 64;
  c.vocab = vocab;
  c.context = context;
  c.vscale = vscale;
  return c;
}

}  // namespace sinkscope
