// bf16 (bfloat16): the top 16 bits of an IEEE float (8 exponent bits, 7 mantissa bits).
// Rounding is to nearest, ties to even, as CUDA's __float2bfloat16_rn; a NaN stays a
// (quiet) NaN, ±Inf stays ±Inf, and a finite value too large rounds to ±Inf. The same
// code runs on the host and the device (SINKSCOPE_HD), so the CPU backend's bf16 mode and
// a GPU's kernels round identically; tests/backend_parity_test holds it to the rule.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SINKSCOPE_HD __host__ __device__
#else
#define SINKSCOPE_HD
#endif

namespace sinkscope {

SINKSCOPE_HD inline uint16_t FloatToBf16Bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x007FFFFFu) != 0) {
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);  // NaN: keep it, quiet
  }
  bits += 0x7FFFu + ((bits >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<uint16_t>(bits >> 16);
}

SINKSCOPE_HD inline float Bf16BitsToFloat(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// x as the nearest bf16 value, in a float.
SINKSCOPE_HD inline float RoundToBf16(float x) { return Bf16BitsToFloat(FloatToBf16Bits(x)); }

}  // namespace sinkscope
