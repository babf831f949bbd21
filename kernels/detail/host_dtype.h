// splitq kernels (internal): host-side bf16 / fp16 <-> fp32 conversions, round to nearest
// even, bit-compatible with CUDA's __float2bfloat16_rn / __float2half_rn on finite values.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels/common.h"

namespace splitq::kernels::detail {

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float BFloat16ToFloat(uint16_t h) { return BitsFloat(static_cast<uint32_t>(h) << 16); }

inline uint16_t FloatToBFloat16(float f) {
  const uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return BitsFloat(sign | 0x7f800000u | (mantissa << 13));  // Inf/NaN
  if (exponent != 0) return BitsFloat(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  if (mantissa == 0) return BitsFloat(sign);
  // Subnormal half: value = mantissa * 2^-24, exact in fp32.
  const float magnitude = static_cast<float>(mantissa) * (1.0f / 16777216.0f);
  return sign ? -magnitude : magnitude;
}

inline uint16_t FloatToHalf(float f) {
  const uint32_t u = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((abs >> 13) & 0x1ffu));
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to Inf
  if (abs >= 0x38800000u) {                                              // normal half
    const uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
    return static_cast<uint16_t>(sign | ((rounded - (112u << 23)) >> 13));
  }
  // Subnormal or zero half: round |f| / 2^-24 to nearest even integer.
  if (abs < 0x33000000u) return sign;  // below half of the smallest subnormal
  const uint32_t exponent = abs >> 23;
  const uint32_t mantissa = (abs & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - exponent;  // 14 .. 24
  const uint32_t halfway = 1u << (shift - 1);
  uint32_t value = mantissa >> shift;
  const uint32_t remainder = mantissa & ((1u << shift) - 1u);
  if (remainder > halfway || (remainder == halfway && (value & 1u))) ++value;
  return static_cast<uint16_t>(sign | value);
}

// Typed element access for the CPU paths.
template <DType D>
struct HostElement;
template <>
struct HostElement<DType::kFloat32> {
  using Storage = float;
  static float Load(Storage v) { return v; }
  static Storage Store(float v) { return v; }
};
template <>
struct HostElement<DType::kBFloat16> {
  using Storage = uint16_t;
  static float Load(Storage v) { return BFloat16ToFloat(v); }
  static Storage Store(float v) { return FloatToBFloat16(v); }
};
template <>
struct HostElement<DType::kFloat16> {
  using Storage = uint16_t;
  static float Load(Storage v) { return HalfToFloat(v); }
  static Storage Store(float v) { return FloatToHalf(v); }
};

}  // namespace splitq::kernels::detail
