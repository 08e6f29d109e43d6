// A deterministic token stream for engine and training tests: n tokens of a fixed
// pattern over a 50-token vocabulary, the last tenth held out for validation.
#pragma once

#include <vector>

#include "data/data.h"

namespace sinkscope {

inline DataSplits Synthetic(int n) {
  std::vector<int32_t> tokens(n);
  for (int i = 0; i < n; ++i) tokens[i] = (i * 7 + i / 13) % 50;
  DataSplits d;
  d.train = TokenStream(std::vector<int32_t>(tokens.begin(), tokens.begin() + n * 9 / 10));
  d.val = TokenStream(std::vector<int32_t>(tokens.begin() + n * 9 / 10, tokens.end()));
  d.max_token = 49;
  return d;
}

}  // namespace sinkscope
