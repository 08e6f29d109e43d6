// What the whole-step comparisons of two backends share (cuda_step_test, cuda_bf16_step_test):
// a deterministic batch and the normalised error of one tensor against another.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace sinkscope {

// B sequences of T tokens (and next-token targets) below V, varied by `salt`.
inline void Batch(int B, int T, int V, int salt, std::vector<int32_t>* tokens, std::vector<int32_t>* targets) {
  tokens->resize(static_cast<size_t>(B) * T);
  targets->resize(tokens->size());
  for (int i = 0; i < B * T; ++i) {
    (*tokens)[i] = (i * 7 + i / 5 + salt) % V;
    (*targets)[i] = (i * 11 + i / 3 + 2 * salt + 1) % V;
  }
}

// max |got − want| / max(max |want|, 1e-3) over elements [from, from + n) (all by default);
// infinite when `got` has a non-finite value there.
inline double NormError(const std::vector<float>& got, const std::vector<float>& want, size_t from = 0,
                        size_t n = SIZE_MAX) {
  double err = 0, scale = 1e-3;
  const size_t end = n == SIZE_MAX ? want.size() : std::min(want.size(), from + n);
  for (size_t i = from; i < end; ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    err = std::max(err, std::abs(static_cast<double>(got[i]) - want[i]));
    scale = std::max(scale, std::abs(static_cast<double>(want[i])));
  }
  return err / scale;
}

}  // namespace sinkscope
