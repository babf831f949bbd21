// splitq kernels: Philox4x32-10 counter-based random numbers, identical on host and device.
//
// Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC'11); the same generator
// as Random123's philox4x32_10 and cuRAND's Philox. Stochastic rounding draws element e of
// step t under seed S as:
//   key     = {lo32(S), hi32(S)}
//   counter = {lo32(e / 4), hi32(e / 4), lo32(t), hi32(t)}
//   u       = (Philox4x32_10(counter, key)[e % 4] >> 8) * 2^-24      (in [0, 1))
#pragma once

#include <cstdint>

#include "kernels/common.h"  // SPLITQ_HOST_DEVICE

namespace splitq::kernels {

struct Philox4 {
  uint32_t v[4];
};

SPLITQ_HOST_DEVICE void PhiloxMulHiLo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  *lo = static_cast<uint32_t>(product);
}

SPLITQ_HOST_DEVICE Philox4 Philox4x32_10(Philox4 ctr, uint32_t key0, uint32_t key1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    PhiloxMulHiLo(kM0, ctr.v[0], &hi0, &lo0);
    PhiloxMulHiLo(kM1, ctr.v[2], &hi1, &lo1);
    ctr = Philox4{{hi1 ^ ctr.v[1] ^ key0, lo1, hi0 ^ ctr.v[3] ^ key1, lo0}};
    key0 += kW0;
    key1 += kW1;
  }
  return ctr;
}

// The four 32-bit draws for elements 4*block .. 4*block+3 of `step` under `seed`.
SPLITQ_HOST_DEVICE Philox4 PhiloxBlock(uint64_t seed, uint64_t step, uint64_t block) {
  return Philox4x32_10(Philox4{{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                                static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32)}},
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// A 32-bit draw to a float in [0, 1) with 24 bits of resolution (exact in fp32).
SPLITQ_HOST_DEVICE float PhiloxUniform(uint32_t draw) {
  return static_cast<float>(draw >> 8) * (1.0f / 16777216.0f);
}

}  // namespace splitq::kernels
