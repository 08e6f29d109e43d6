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

// IEEE half (f16: 5 exponent bits, 10 mantissa bits), exactly widened.
SINKSCOPE_HD inline float F16BitsToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  uint32_t bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);  // Inf, NaN
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);  // 127 − 15 = 112
  } else if (mantissa == 0) {
    bits = sign;  // ±0
  } else {  // subnormal: normalise
    int e = -1;
    uint32_t m = mantissa;
    do {
      ++e;
      m <<= 1;
    } while ((m & 0x400u) == 0);
    bits = sign | (static_cast<uint32_t>(112 - e) << 23) | ((m & 0x3FFu) << 13);
  }
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// x as the nearest f16 (ties to even; too large: ±Inf; NaN stays NaN).
SINKSCOPE_HD inline uint16_t FloatToF16Bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) return static_cast<uint16_t>(sign | 0x7C00u | (abs > 0x7F800000u ? 0x200u : 0));
  if (abs >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds past 65504
  if (abs < 0x38800000u) {  // below the smallest normal half: subnormal or 0
    if (abs < 0x33000000u) return sign;  // under half the smallest subnormal
    const uint32_t e = abs >> 23, m = (abs & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126 - e;  // so that the result is in units of 2^-24
    uint32_t r = m >> shift;
    const uint32_t rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = abs - 0x38000000u;  // rebias the exponent (127 → 15)
  r = (r + 0xFFFu + ((r >> 13) & 1u)) >> 13;
  return static_cast<uint16_t>(sign | r);
}

}  // namespace sinkscope
