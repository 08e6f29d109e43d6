// Deterministic random numbers with a state that fits in a checkpoint: the same seed
// gives the same stream on every platform and standard library (std::normal_distribution
// does not promise that).
#pragma once

#include <cmath>
#include <cstdint>

namespace sinkscope {

// SplitMix64: a counter-based generator; Mix(x) is a good 64-bit hash.
inline uint64_t Mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

class Rng {
 public:
  explicit Rng(uint64_t seed = 0) : state_(seed) {}
  uint64_t state() const { return state_; }
  void set_state(uint64_t s) { state_ = s; }
  uint64_t NextU64() { return Mix64(state_++); }
  // Uniform in [0, 1) with 53 bits.
  double Uniform() { return static_cast<double>(NextU64() >> 11) * 0x1.0p-53; }
  // Uniform integer in [0, n).
  uint64_t Below(uint64_t n) { return NextU64() % n; }
  // Standard normal by Box–Muller (one value per call, two uniforms consumed).
  double Normal() {
    double u1 = Uniform();
    const double u2 = Uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
  }

 private:
  uint64_t state_;
};

}  // namespace sinkscope
