// splitq kernels (internal): per-element quantizer arithmetic shared by the CPU and CUDA
// paths, so that both give the same codes. Every float operation is spelled out with
// round-to-nearest intrinsics on the device (no FMA contraction); the CPU files are built
// with -ffp-contract=off for the same reason.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/common.h"
#include "kernels/philox.h"

namespace splitq::kernels::detail {

#if defined(__CUDA_ARCH__)
SPLITQ_HOST_DEVICE float Mul(float a, float b) { return __fmul_rn(a, b); }
SPLITQ_HOST_DEVICE float Add(float a, float b) { return __fadd_rn(a, b); }
SPLITQ_HOST_DEVICE float Sub(float a, float b) { return __fsub_rn(a, b); }
SPLITQ_HOST_DEVICE float RoundEven(float v) { return rintf(v); }
#else
SPLITQ_HOST_DEVICE float Mul(float a, float b) { return a * b; }
SPLITQ_HOST_DEVICE float Add(float a, float b) { return a + b; }
SPLITQ_HOST_DEVICE float Sub(float a, float b) { return a - b; }
// Round half to even for |v| <= 2^22 (callers clamp first). Unlike rintf this vectorises
// with plain SSE2, which is all a baseline x86-64 client has.
SPLITQ_HOST_DEVICE float RoundEven(float v) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (v + kMagic) - kMagic;
}
#endif

// Per-group constants of the quantizer in common.h, in float. lo/hi are the code range
// shifted by the zero point (qmin - z, qmax - z), so x_hat = clamp(rint(v), lo, hi) * s + beta.
struct GroupQuant {
  float scale;
  float inv_scale;
  float offset;
  float lo;
  float hi;
};

SPLITQ_HOST_DEVICE GroupQuant LoadGroupQuant(const QuantParams& p, int64_t g) {
  const int bits = p.bits != nullptr ? p.bits[g] : p.uniform_bits;
  const float z = p.zero_point != nullptr ? p.zero_point[g] : 0.0f;
  GroupQuant q;
  q.scale = p.scale[g];
  q.inv_scale = 1.0f / q.scale;
  q.offset = p.offset != nullptr ? p.offset[g] : 0.0f;
  q.lo = static_cast<float>(QMin(bits, p.is_signed)) - z;
  q.hi = static_cast<float>(QMax(bits, p.is_signed)) - z;
  return q;
}

// v = (x - beta) / s, as x multiplied by 1/s (PyTorch does the same).
SPLITQ_HOST_DEVICE float ScaledValue(float x, const GroupQuant& q) {
  return Mul(Sub(x, q.offset), q.inv_scale);
}

// Fake-quant of one element. NaN propagates (comparisons with NaN are false).
SPLITQ_HOST_DEVICE float FakeQuantValue(float x, const GroupQuant& q) {
  float v = ScaledValue(x, q);
  v = v < q.lo ? q.lo : v;
  v = v > q.hi ? q.hi : v;
  return Add(Mul(RoundEven(v), q.scale), q.offset);
}

// Stored wire code (q - qmin, in 0 .. 2^k - 1) of one element, rounding to nearest.
// NaN encodes as 0.
SPLITQ_HOST_DEVICE uint32_t NearestCode(float x, const GroupQuant& q) {
  float v = ScaledValue(x, q);
  v = v > q.lo ? v : q.lo;  // NaN -> lo
  v = v < q.hi ? v : q.hi;
  return static_cast<uint32_t>(static_cast<int32_t>(Sub(RoundEven(v), q.lo)));
}

// Stored wire code with stochastic rounding: floor(clamp(v) - lo + u), u in [0, 1).
SPLITQ_HOST_DEVICE uint32_t StochasticCode(float x, const GroupQuant& q, float u) {
  float v = ScaledValue(x, q);
  v = v > q.lo ? v : q.lo;  // NaN -> lo
  v = v < q.hi ? v : q.hi;
  const float shifted = Add(Sub(v, q.lo), u);  // >= 0, so truncation is floor
  const uint32_t code = static_cast<uint32_t>(shifted);
  const uint32_t max_code = static_cast<uint32_t>(q.hi - q.lo);
  return code < max_code ? code : max_code;
}

// Dequantized value of a stored code.
SPLITQ_HOST_DEVICE float DequantCode(uint32_t code, const GroupQuant& q) {
  return Add(Mul(Add(static_cast<float>(code), q.lo), q.scale), q.offset);
}

// Per-element terms of the fused backward (lsq_backward.h).
struct LsqGrad {
  float dx;
  float dscale;   // dy * d x_hat / d s
  float doffset;  // dy * d x_hat / d beta
};

SPLITQ_HOST_DEVICE LsqGrad LsqElementGrad(float x, float dy, const GroupQuant& q) {
  const float v = ScaledValue(x, q);
  float c = v < q.lo - 1.0f ? q.lo - 1.0f : v;  // keeps RoundEven exact, keeps the side
  c = c > q.hi + 1.0f ? q.hi + 1.0f : c;
  const float r = RoundEven(c);
  if (r < q.lo) return LsqGrad{0.0f, Mul(dy, q.lo), dy};
  if (r > q.hi) return LsqGrad{0.0f, Mul(dy, q.hi), dy};
  return LsqGrad{dy, Mul(dy, Sub(r, v)), 0.0f};
}

}  // namespace splitq::kernels::detail
