// Tests for kernels/pack.h (CPU path) and kernels/philox.h: the documented byte layout,
// round trips, stochastic rounding, and errors.
#include "kernels/pack.h"

#include <gtest/gtest.h>

#include <cstdio>

#include "kernels/detail/philox_batch.h"
#include "kernels/fake_quant.h"
#include "kernels/philox.h"
#include "tests/kernels/test_util.h"

namespace splitq::kernels {
namespace {

// Known-answer vectors of Random123 (kat_vectors, philox4x32 with 10 rounds).
TEST(Philox, MatchesRandom123KnownAnswers) {
  Philox4 zero = Philox4x32_10(Philox4{{0, 0, 0, 0}}, 0, 0);
  EXPECT_EQ(zero.v[0], 0x6627e8d5u);
  EXPECT_EQ(zero.v[1], 0xe169c58du);
  EXPECT_EQ(zero.v[2], 0xbc57ac4cu);
  EXPECT_EQ(zero.v[3], 0x9b00dbd8u);
  Philox4 ones = Philox4x32_10(Philox4{{~0u, ~0u, ~0u, ~0u}}, ~0u, ~0u);
  EXPECT_EQ(ones.v[0], 0x408f276du);
  EXPECT_EQ(ones.v[1], 0x41c83b0eu);
  EXPECT_EQ(ones.v[2], 0xa20bc7c6u);
  EXPECT_EQ(ones.v[3], 0x6d5451fdu);
  Philox4 pi = Philox4x32_10(Philox4{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}},
                             0xa4093822u, 0x299f31d0u);
  EXPECT_EQ(pi.v[0], 0xd16cfe09u);
  EXPECT_EQ(pi.v[1], 0x94fdccebu);
  EXPECT_EQ(pi.v[2], 0x5001e420u);
  EXPECT_EQ(pi.v[3], 0x24126ea1u);
}

// Writes codes into a bit stream one bit at a time: the layout of pack.h, spelled out.
std::vector<uint8_t> ReferencePack(const std::vector<std::vector<uint32_t>>& codes_per_group,
                                   const std::vector<uint8_t>& bits) {
  std::vector<uint8_t> out;
  for (size_t g = 0; g < bits.size(); ++g) {
    std::vector<uint8_t> segment((codes_per_group[g].size() * bits[g] + 7) / 8, 0);
    size_t bit = 0;
    for (uint32_t code : codes_per_group[g]) {
      for (int b = 0; b < bits[g]; ++b, ++bit) {
        if ((code >> b) & 1u) segment[bit / 8] |= static_cast<uint8_t>(1u << (bit % 8));
      }
    }
    out.insert(out.end(), segment.begin(), segment.end());
  }
  return out;
}

struct PackCase {
  std::vector<int64_t> shape;
  Granularity granularity;
  int axis;
};

class PackLayout : public ::testing::TestWithParam<std::tuple<PackCase, DType>> {};

TEST_P(PackLayout, BytesFollowTheDocumentedLayoutAndRoundTrip) {
  const auto& [c, dtype] = GetParam();
  auto layout = MakeGroupLayout(c.shape, c.granularity, c.axis);
  ASSERT_TRUE(layout.ok());
  const int64_t groups = layout->groups, m_count = layout->per_group();
  std::vector<uint8_t> bits(groups);
  std::vector<float> scale(groups), offset(groups);
  for (int64_t g = 0; g < groups; ++g) {
    bits[g] = static_cast<uint8_t>(1 + (g * 5 + 2) % 8);
    scale[g] = 4.0f / static_cast<float>((1 << bits[g]) - 1);
    offset[g] = -2.0f;
  }
  const std::vector<float> values = testing::RandomValues(layout->numel(), 5, 1.0f);
  const std::vector<uint8_t> x = testing::ToBytes(values, dtype);
  QuantParams p;
  p.scale = scale.data();
  p.offset = offset.data();
  p.bits = bits.data();
  std::vector<int64_t> offsets(groups + 1);
  ASSERT_TRUE(PackedOffsets(bits, m_count, absl::MakeSpan(offsets)).ok());
  std::vector<uint8_t> packed(offsets[groups], 0xAB);  // poison: padding must come out zero
  ASSERT_TRUE(QuantizePack({}, dtype, *layout, p, RoundingSpec{}, x.data(), offsets.data(),
                           packed.data(), offsets[groups])
                  .ok());
  // Expected codes from the reference quantizer, in packed order m = o * inner + j.
  std::vector<std::vector<uint32_t>> codes(groups);
  for (int64_t g = 0; g < groups; ++g) {
    const testing::RefQuant ref{scale[g], offset[g], 0.0f, bits[g], false};
    for (int64_t m = 0; m < m_count; ++m) {
      const int64_t i = ((m / layout->inner) * groups + g) * layout->inner + m % layout->inner;
      codes[g].push_back(static_cast<uint32_t>(ref.Code(testing::ElementAt(x, dtype, i))));
    }
  }
  EXPECT_EQ(packed, ReferencePack(codes, bits));
  // Unpack gives exactly the fake-quant of the same parameters.
  std::vector<uint8_t> y(x.size()), fq(x.size());
  ASSERT_TRUE(UnpackDequantize({}, dtype, *layout, p, packed.data(), offsets[groups],
                               offsets.data(), y.data())
                  .ok());
  ASSERT_TRUE(FakeQuantForward({}, dtype, *layout, p, x.data(), fq.data()).ok());
  EXPECT_EQ(y, fq);
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, PackLayout,
    ::testing::Combine(::testing::Values(PackCase{{21, 9}, Granularity::kChannel, 1},
                                         PackCase{{8, 16}, Granularity::kChannel, 1},
                                         PackCase{{1, 3}, Granularity::kChannel, 1},
                                         PackCase{{3, 4, 5, 2}, Granularity::kChannel, 1},
                                         PackCase{{5, 16}, Granularity::kChannel, 0},
                                         PackCase{{13, 7}, Granularity::kTensor, 0},
                                         PackCase{{6, 5}, Granularity::kToken, 0},
                                         PackCase{{3000, 40}, Granularity::kChannel, 1},
                                         PackCase{{2, 20000}, Granularity::kChannel, 0},
                                         PackCase{{3, 6, 1100}, Granularity::kChannel, 1}),
                       ::testing::Values(DType::kFloat32, DType::kBFloat16, DType::kFloat16)));

TEST(Pack, HandWorkedExample) {
  // Two channels, 3 bits and 5 bits, four rows, scale 1, offset 0, unsigned codes.
  const std::vector<float> x = {1, 17, 2, 18, 7, 31, 0, 5};  // [4, 2], channels last
  const std::vector<uint8_t> bits = {3, 5};
  const std::vector<float> scale = {1, 1}, offset = {0, 0};
  std::vector<int64_t> offsets(3);
  ASSERT_TRUE(PackedOffsets(bits, 4, absl::MakeSpan(offsets)).ok());
  EXPECT_EQ(offsets, (std::vector<int64_t>{0, 2, 5}));
  QuantParams p;
  p.scale = scale.data();
  p.offset = offset.data();
  p.bits = bits.data();
  std::vector<uint8_t> packed(5);
  ASSERT_TRUE(QuantizePack({}, DType::kFloat32, GroupLayout{4, 2, 1}, p, RoundingSpec{}, x.data(),
                           offsets.data(), packed.data(), 5)
                  .ok());
  // channel 0 codes 1,2,7,0 (3 bits): 001 010 111 000 -> bits LSB first:
  //   0x1 | 2 << 3 | 7 << 6 | 0 << 9 = 0x1D1 -> bytes D1 01
  // channel 1 codes 17,18,31,5 (5 bits): 17 | 18 << 5 | 31 << 10 | 5 << 15 = 0x2FE51
  //   -> bytes 51 FE 02
  EXPECT_EQ(packed, (std::vector<uint8_t>{0xD1, 0x01, 0x51, 0xFE, 0x02}));
}

TEST(Pack, StochasticRoundingIsUnbiasedAndReproducible) {
  const int64_t n = 200000;
  std::vector<float> x(n, 0.3f);  // between codes 0 and 1 with scale 1
  const float scale = 1.0f, offset = 0.0f;
  const uint8_t bits = 4;
  QuantParams p;
  p.scale = &scale;
  p.offset = &offset;
  p.bits = &bits;
  std::vector<int64_t> offsets(2);
  ASSERT_TRUE(PackedOffsets({&bits, 1}, n, absl::MakeSpan(offsets)).ok());
  std::vector<uint8_t> a(offsets[1]), b(offsets[1]), c(offsets[1]);
  const GroupLayout layout{1, 1, n};
  ASSERT_TRUE(QuantizePack({}, DType::kFloat32, layout, p, {Rounding::kStochastic, 42, 7}, x.data(),
                           offsets.data(), a.data(), offsets[1])
                  .ok());
  ASSERT_TRUE(QuantizePack({}, DType::kFloat32, layout, p, {Rounding::kStochastic, 42, 7}, x.data(),
                           offsets.data(), b.data(), offsets[1])
                  .ok());
  ASSERT_TRUE(QuantizePack({}, DType::kFloat32, layout, p, {Rounding::kStochastic, 42, 8}, x.data(),
                           offsets.data(), c.data(), offsets[1])
                  .ok());
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  std::vector<float> y(n);
  ASSERT_TRUE(UnpackDequantize({}, DType::kFloat32, layout, p, a.data(), offsets[1], offsets.data(),
                               y.data())
                  .ok());
  double mean = 0;
  for (float v : y) {
    ASSERT_TRUE(v == 0.0f || v == 1.0f);
    mean += v;
  }
  mean /= n;
  // Binomial(n, 0.3): standard error 0.001; 5 sigma.
  EXPECT_NEAR(mean, 0.3, 0.005);
}

// Stochastic codes follow the documented keying exactly: u = Philox(seed, step, e / 4)[e % 4]
// >> 8 * 2^-24 with e = g * M + m, code = min(floor(clamp(v) - lo + u), 2^k - 1).
TEST(Pack, StochasticCodesFollowTheDocumentedPhiloxKeying) {
  // The third layout's runs of x (1100 codes) cross the CPU path's chunks of 1024 codes, and
  // its 7 groups take every width from 2 to 8 bits; the last one's groups (10000 codes) cross
  // its units of 8192 codes, and it is large enough to be split over threads.
  for (const GroupLayout layout : {GroupLayout{37, 5, 1}, GroupLayout{3, 4, 7},
                                   GroupLayout{2, 7, 1100}, GroupLayout{2, 4, 5000}}) {
    const int64_t groups = layout.groups, per_group = layout.per_group();
    std::vector<uint8_t> bits(groups);
    std::vector<float> scale(groups), offset(groups);
    for (int64_t g = 0; g < groups; ++g) {
      bits[g] = static_cast<uint8_t>(2 + g % 7);
      scale[g] = 0.37f;
      offset[g] = -1.5f;
    }
    const std::vector<float> x = testing::RandomValues(layout.numel(), 21, 1.0f);
    QuantParams p;
    p.scale = scale.data();
    p.offset = offset.data();
    p.bits = bits.data();
    std::vector<int64_t> offsets(groups + 1);
    ASSERT_TRUE(PackedOffsets(bits, per_group, absl::MakeSpan(offsets)).ok());
    std::vector<uint8_t> packed(offsets[groups]);
    const uint64_t seed = 0x123456789abcdefull, step = 77;
    ASSERT_TRUE(QuantizePack({}, DType::kFloat32, layout, p, {Rounding::kStochastic, seed, step},
                             x.data(), offsets.data(), packed.data(), offsets[groups])
                    .ok());
    std::vector<std::vector<uint32_t>> codes(groups);
    for (int64_t g = 0; g < groups; ++g) {
      const float inv = 1.0f / scale[g], lo = 0.0f, hi = static_cast<float>((1 << bits[g]) - 1);
      for (int64_t m = 0; m < per_group; ++m) {
        const int64_t i = ((m / layout.inner) * groups + g) * layout.inner + m % layout.inner;
        const uint64_t e = static_cast<uint64_t>(g * per_group + m);
        const Philox4 draw = PhiloxBlock(seed, step, e / 4);
        const float u = static_cast<float>(draw.v[e % 4] >> 8) * (1.0f / 16777216.0f);
        float v = (x[i] - offset[g]) * inv;
        v = v > lo ? v : lo;
        v = v < hi ? v : hi;
        const uint32_t code = static_cast<uint32_t>((v - lo) + u);
        codes[g].push_back(std::min(code, static_cast<uint32_t>(hi)));
      }
    }
    EXPECT_EQ(packed, ReferencePack(codes, bits)) << "inner " << layout.inner;
  }
}

// The batched draws (eight blocks at once; AVX2 where the CPU has it) equal PhiloxBlock's, bit
// for bit, across the 32-bit carries of the block counter, seed and step.
TEST(PhiloxBatch, EqualsTheScalarGenerator) {
  std::printf("PhiloxUniforms32 uses %s\n", detail::PhiloxBatchUsesAvx2() ? "AVX2" : "scalar");
  const uint64_t seeds[] = {0, 1, 0x123456789abcdefull, ~0ull};
  const uint64_t steps[] = {0, 77, 0xffffffffull, 1ull << 40};
  const uint64_t firsts[] = {0, 5, 0xfffffffcull, 0xfffffffdull, (1ull << 36) + 3, ~0ull - 7};
  for (uint64_t seed : seeds) {
    for (uint64_t step : steps) {
      for (uint64_t first : firsts) {
        float batch[32], scalar[32];
        detail::PhiloxUniforms32(seed, step, first, batch);
        detail::PhiloxUniforms32Scalar(seed, step, first, scalar);
        for (int i = 0; i < 8; ++i) {
          const Philox4 d = PhiloxBlock(seed, step, first + static_cast<uint64_t>(i));
          for (int j = 0; j < 4; ++j) {
            const float want = static_cast<float>(d.v[j] >> 8) * (1.0f / 16777216.0f);
            ASSERT_EQ(batch[4 * i + j], want) << seed << " " << step << " " << first << " " << i;
            ASSERT_EQ(scalar[4 * i + j], want);
          }
        }
      }
    }
  }
}

TEST(Pack, NanEncodesAsLowestCode) {
  const std::vector<float> x = {std::numeric_limits<float>::quiet_NaN(), 3.0f};
  const float scale = 1.0f, offset = -1.0f;
  QuantParams p;
  p.scale = &scale;
  p.offset = &offset;
  p.uniform_bits = 8;
  const uint8_t bits = 8;
  std::vector<int64_t> offsets(2);
  ASSERT_TRUE(PackedOffsets({&bits, 1}, 2, absl::MakeSpan(offsets)).ok());
  std::vector<uint8_t> packed(2);
  ASSERT_TRUE(QuantizePack({}, DType::kFloat32, GroupLayout{1, 1, 2}, p, {}, x.data(),
                           offsets.data(), packed.data(), 2)
                  .ok());
  EXPECT_EQ(packed, (std::vector<uint8_t>{0, 4}));
}

TEST(PackedOffsets, RejectsBadInput) {
  std::vector<int64_t> offsets(3);
  EXPECT_FALSE(PackedOffsets(std::vector<uint8_t>{4, 0}, 10, absl::MakeSpan(offsets)).ok());
  EXPECT_FALSE(PackedOffsets(std::vector<uint8_t>{4, 9}, 10, absl::MakeSpan(offsets)).ok());
  EXPECT_FALSE(PackedOffsets(std::vector<uint8_t>{4}, 10, absl::MakeSpan(offsets)).ok());
  EXPECT_FALSE(
      PackedOffsets(std::vector<uint8_t>{4, 4}, int64_t{1} << 62, absl::MakeSpan(offsets)).ok());
}

}  // namespace
}  // namespace splitq::kernels
