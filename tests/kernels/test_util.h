// splitq tests (kernels): shared helpers: a bit-exact scalar reference of the quantizer in
// kernels/common.h written from its formula, random inputs, and typed buffers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/common.h"
#include "kernels/detail/host_dtype.h"

namespace splitq::kernels::testing {

// Scalar reference: q = clamp(rint((x - beta) * (1/s)) + z, qmin, qmax), x_hat = (q - z) s + beta.
struct RefQuant {
  float scale, offset, zero_point;
  int bits;
  bool is_signed;

  float qmin() const { return static_cast<float>(QMin(bits, is_signed)); }
  float qmax() const { return static_cast<float>(QMax(bits, is_signed)); }
  // The integer code before clamping (NaN for NaN x).
  float RawCode(float x) const {
    const float inv = 1.0f / scale;
    const float v = (x - offset) * inv;
    return std::nearbyint(v) + zero_point;
  }
  float Code(float x) const {
    const float r = RawCode(x);
    return r < qmin() ? qmin() : (r > qmax() ? qmax() : r);
  }
  float FakeQuant(float x) const {
    if (std::isnan(x)) return x;
    return (Code(x) - zero_point) * scale + offset;
  }
};

inline std::vector<float> RandomValues(size_t n, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// A buffer of `dtype` elements holding `values` (converted, round to nearest even).
inline std::vector<uint8_t> ToBytes(const std::vector<float>& values, DType dtype) {
  std::vector<uint8_t> out(values.size() * DTypeSize(dtype));
  for (size_t i = 0; i < values.size(); ++i) {
    if (dtype == DType::kFloat32) {
      std::memcpy(out.data() + 4 * i, &values[i], 4);
    } else {
      const uint16_t h = dtype == DType::kBFloat16 ? detail::FloatToBFloat16(values[i])
                                                   : detail::FloatToHalf(values[i]);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

inline float ElementAt(const std::vector<uint8_t>& bytes, DType dtype, size_t i) {
  if (dtype == DType::kFloat32) {
    float f;
    std::memcpy(&f, bytes.data() + 4 * i, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, bytes.data() + 2 * i, 2);
  return dtype == DType::kBFloat16 ? detail::BFloat16ToFloat(h) : detail::HalfToFloat(h);
}

// The value the kernel sees for x stored as `dtype`, and the value it writes back for v.
inline float RoundTrip(float v, DType dtype) { return ElementAt(ToBytes({v}, dtype), dtype, 0); }

inline bool SameFloat(float a, float b) { return (std::isnan(a) && std::isnan(b)) || a == b; }

}  // namespace splitq::kernels::testing
