// Per-element math of the CUDA kernels, written once for the host and the device
// (SINKSCOPE_HD). The kernels call these; tests/kernel_math_test checks them on the CPU
// against the CPU backend's ops, so a wrong formula is caught without a GPU. Each
// function is the formula of backend.h for one element (or one row's coefficient).
#pragma once

#include <cmath>
#include <cstdint>

#include "engine/bf16.h"  // SINKSCOPE_HD

namespace sinkscope::kmath {

// σ(g), silu(g) = g·σ(g) and silu′(g) = σ(1 + g(1 − σ)).
struct SiluParts {
  float sigmoid, silu, grad;
};
SINKSCOPE_HD inline SiluParts Silu(float g) {
  const float sig = 1.0f / (1.0f + expf(-g));
  return {sig, g * sig, sig * (1.0f + g * (1.0f - sig))};
}

// SwiGLU: h = silu(gate)·up; backward from dh.
SINKSCOPE_HD inline float SwiGlu(float gate, float up) { return Silu(gate).silu * up; }
SINKSCOPE_HD inline void SwiGluGrad(float dh, float gate, float up, float* dgate, float* dup) {
  const SiluParts s = Silu(gate);
  *dup = dh * s.silu;
  *dgate = dh * up * s.grad;
}

// V-scale on one (token, KV head) row: r = ‖v‖², C = c_base·e^θ, φ = r/(r+C).
SINKSCOPE_HD inline double VScaleC(double c_base, float theta) { return c_base * exp(static_cast<double>(theta)); }
SINKSCOPE_HD inline double VScalePhi(double r, double C) { return r / (r + C); }
// ∂L/∂v = φ·ĝ + coef·v with coef = 2C/(r+C)²·(v·ĝ).
SINKSCOPE_HD inline double VScaleGradCoef(double r, double C, double v_dot_g) {
  const double rc = r + C;
  return 2.0 * C / (rc * rc) * v_dot_g;
}
// The row's contribution to ∂L/∂θ: −C·r/(r+C)²·(v·ĝ).
SINKSCOPE_HD inline double VScaleThetaGrad(double r, double C, double v_dot_g) {
  const double rc = r + C;
  return -C * r / (rc * rc) * v_dot_g;
}

// RoPE on one pair (x1, x2) = (x_j, x_{j+dh/2}) with c = f·cos, s = ±f·sin.
SINKSCOPE_HD inline void RotatePair(float x1, float x2, float c, float s, float* o1, float* o2) {
  *o1 = x1 * c - x2 * s;
  *o2 = x2 * c + x1 * s;
}

// RMSNorm: rstd = (mean(x²) + eps)^(-1/2) from the row's Σx².
SINKSCOPE_HD inline float RmsNormRstd(float sum_squares, int d, float eps) {
  return 1.0f / sqrtf(sum_squares / static_cast<float>(d) + eps);
}
// dx_c = base + r γ_c g_c − coef·x_c with coef = r³ (Σ_j γ_j g_j x_j)/d.
SINKSCOPE_HD inline float RmsNormBackwardCoef(float rstd, float dot, int d) {
  return rstd * rstd * rstd * dot / static_cast<float>(d);
}
SINKSCOPE_HD inline float RmsNormBackwardElement(float base, float rstd, float gamma, float g, float coef, float x) {
  return base + (rstd * gamma * g - coef * x);
}

// AdamW on one element; bc1 = 1 − β1^step, bc2 = 1 − β2^step (computed once, in double).
SINKSCOPE_HD inline void AdamWElement(float* p, float g, float* m, float* v, float lr, float beta1, float beta2,
                                      float eps, float weight_decay, double bc1, double bc2) {
  *m = beta1 * *m + (1.0f - beta1) * g;
  *v = beta2 * *v + (1.0f - beta2) * g * g;
  const float mhat = static_cast<float>(*m / bc1);
  const float vhat = static_cast<float>(*v / bc2);
  *p -= lr * (mhat / (sqrtf(vhat) + eps) + weight_decay * *p);
}

// The global-norm clip: the factor applied to every gradient, 1 when not clipping.
SINKSCOPE_HD inline float ClipScale(double sum_squares, double grad_clip) {
  const double norm = sqrt(sum_squares);
  return (grad_clip > 0 && norm > grad_clip) ? static_cast<float>(grad_clip / norm) : 1.0f;
}

}  // namespace sinkscope::kmath
