#include "kernels/detail/philox_batch.h"

#include "kernels/philox.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SPLITQ_PHILOX_AVX2 1
#endif

namespace splitq::kernels::detail {

void PhiloxUniforms32Scalar(uint64_t seed, uint64_t step, uint64_t first, float out[32]) {
  for (int i = 0; i < 8; ++i) {
    const Philox4 d = PhiloxBlock(seed, step, first + static_cast<uint64_t>(i));
    for (int j = 0; j < 4; ++j) out[4 * i + j] = PhiloxUniform(d.v[j]);
  }
}

#if defined(SPLITQ_PHILOX_AVX2)
namespace {

// hi and lo halves of a * b for eight 32-bit lanes (a broadcast constant): _mm256_mul_epu32
// multiplies the even lanes; the odd ones are shifted down and multiplied the same way.
__attribute__((target("avx2"))) inline void MulHiLo8(__m256i a, __m256i b, __m256i* hi,
                                                     __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, b);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), _mm256_srli_epi64(b, 32));
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

__attribute__((target("avx2"))) void PhiloxUniforms32Avx2(uint64_t seed, uint64_t step,
                                                          uint64_t first, float out[32]) {
  alignas(32) uint32_t lo_block[8], hi_block[8];
  for (int i = 0; i < 8; ++i) {
    const uint64_t block = first + static_cast<uint64_t>(i);
    lo_block[i] = static_cast<uint32_t>(block);
    hi_block[i] = static_cast<uint32_t>(block >> 32);
  }
  __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo_block));
  __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi_block));
  __m256i c2 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(step)));
  __m256i c3 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(step >> 32)));
  uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    MulHiLo8(m0, c0, &hi0, &lo0);
    MulHiLo8(m1, c2, &hi1, &lo1);
    const __m256i k0 = _mm256_set1_epi32(static_cast<int>(key0));
    const __m256i k1 = _mm256_set1_epi32(static_cast<int>(key1));
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), k0);
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), k1);
    c3 = lo0;
    key0 += 0x9E3779B9u;
    key1 += 0xBB67AE85u;
  }
  // Draw j of lane i goes to out[4 * i + j]: transpose the four vectors of eight lanes, and
  // turn each draw into (draw >> 8) * 2^-24 (exact in fp32, as PhiloxUniform).
  const __m256 scale = _mm256_set1_ps(1.0f / 16777216.0f);
  const __m256 f0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(c0, 8)), scale);
  const __m256 f1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(c1, 8)), scale);
  const __m256 f2 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(c2, 8)), scale);
  const __m256 f3 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(c3, 8)), scale);
  // 4x8 -> 8x4: interleave pairs, then quads; lanes 0-3 of each 128-bit half hold one block.
  const __m256 t0 = _mm256_unpacklo_ps(f0, f1);                        // a0 b0 a1 b1 | a4 b4 a5 b5
  const __m256 t1 = _mm256_unpackhi_ps(f0, f1);                        // a2 b2 a3 b3 | a6 b6 a7 b7
  const __m256 t2 = _mm256_unpacklo_ps(f2, f3);                        // c0 d0 c1 d1 | c4 d4 c5 d5
  const __m256 t3 = _mm256_unpackhi_ps(f2, f3);                        // c2 d2 c3 d3 | c6 d6 c7 d7
  const __m256 b04 = _mm256_shuffle_ps(t0, t2, 0x44);                  // a0 b0 c0 d0 | a4 b4 c4 d4
  const __m256 b15 = _mm256_shuffle_ps(t0, t2, 0xEE);                  // a1 b1 c1 d1 | a5 b5 c5 d5
  const __m256 b26 = _mm256_shuffle_ps(t1, t3, 0x44);                  // a2 .. | a6 ..
  const __m256 b37 = _mm256_shuffle_ps(t1, t3, 0xEE);                  // a3 .. | a7 ..
  _mm256_storeu_ps(out + 0, _mm256_permute2f128_ps(b04, b15, 0x20));   // blocks 0, 1
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(b26, b37, 0x20));   // blocks 2, 3
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(b04, b15, 0x31));  // blocks 4, 5
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(b26, b37, 0x31));  // blocks 6, 7
}

const bool kHasAvx2 = [] {
  __builtin_cpu_init();  // a static initializer may run before the library's own
  return __builtin_cpu_supports("avx2") != 0;
}();

}  // namespace

bool PhiloxBatchUsesAvx2() { return kHasAvx2; }

void PhiloxUniforms32(uint64_t seed, uint64_t step, uint64_t first, float out[32]) {
  if (kHasAvx2) {
    PhiloxUniforms32Avx2(seed, step, first, out);
  } else {
    PhiloxUniforms32Scalar(seed, step, first, out);
  }
}
#else
bool PhiloxBatchUsesAvx2() { return false; }

void PhiloxUniforms32(uint64_t seed, uint64_t step, uint64_t first, float out[32]) {
  PhiloxUniforms32Scalar(seed, step, first, out);
}
#endif

}  // namespace splitq::kernels::detail
