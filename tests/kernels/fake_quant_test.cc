// Tests for kernels/fake_quant.h (CPU path) against the scalar reference of the formula.
#include "kernels/fake_quant.h"

#include <gtest/gtest.h>

#include <limits>
#include <tuple>

#include "tests/kernels/test_util.h"

namespace splitq::kernels {
namespace {

using testing::RefQuant;

struct Case {
  std::vector<int64_t> shape;
  Granularity granularity;
  int axis;
};

class FakeQuantSweep
    : public ::testing::TestWithParam<std::tuple<Case, int /*bits, 0 = mixed*/, bool, DType>> {};

TEST_P(FakeQuantSweep, MatchesReferenceElementwise) {
  const auto& [c, bits, is_signed, dtype] = GetParam();
  auto layout = MakeGroupLayout(c.shape, c.granularity, c.axis);
  ASSERT_TRUE(layout.ok()) << layout.status();
  const int64_t n = layout->numel(), groups = layout->groups;
  std::mt19937 rng(static_cast<uint32_t>(n * 31 + groups + bits));
  std::vector<float> scale(groups), offset(groups), zp(groups);
  std::vector<uint8_t> group_bits(groups);
  for (int64_t g = 0; g < groups; ++g) {
    scale[g] = 0.01f + 0.2f * static_cast<float>(rng() % 1000) / 1000.0f;
    offset[g] = (g % 3 == 0) ? 0.0f : 0.1f * static_cast<float>(static_cast<int>(rng() % 21) - 10);
    group_bits[g] = static_cast<uint8_t>(bits == 0 ? 1 + rng() % 8 : bits);
    const int levels = (1 << group_bits[g]);
    zp[g] = (g % 2 == 0) ? 0.0f : static_cast<float>(static_cast<int>(rng() % levels) - levels / 2);
  }
  std::vector<float> values = testing::RandomValues(static_cast<size_t>(n), 7, 2.0f);
  if (n > 3) {  // saturation and non-finite corner cases
    values[0] = 1e9f;
    values[1] = -1e9f;
    values[2] = std::numeric_limits<float>::infinity();
    values[3] = std::numeric_limits<float>::quiet_NaN();
  }
  const std::vector<uint8_t> x = testing::ToBytes(values, dtype);
  std::vector<uint8_t> y(x.size());
  QuantParams p;
  p.scale = scale.data();
  p.offset = offset.data();
  p.zero_point = zp.data();
  p.bits = group_bits.data();
  p.is_signed = is_signed;
  ASSERT_TRUE(FakeQuantForward({}, dtype, *layout, p, x.data(), y.data()).ok());
  int64_t mismatches = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = (i / layout->inner) % groups;
    const RefQuant ref{scale[g], offset[g], zp[g], group_bits[g], is_signed};
    const float in = testing::ElementAt(x, dtype, static_cast<size_t>(i));
    const float expected = testing::RoundTrip(ref.FakeQuant(in), dtype);
    const float got = testing::ElementAt(y, dtype, static_cast<size_t>(i));
    if (!testing::SameFloat(expected, got)) {
      if (++mismatches < 5)
        ADD_FAILURE() << "element " << i << " x=" << in << " expected " << expected << " got "
                      << got;
    }
  }
  EXPECT_EQ(mismatches, 0);
}

const Case kCases[] = {
    {{64, 16}, Granularity::kChannel, 1},      // channels last (inner == 1)
    {{7, 3}, Granularity::kChannel, 1},        // odd sizes
    {{1, 1}, Granularity::kChannel, 1},        // one channel, one element
    {{4, 5, 3, 3}, Granularity::kChannel, 1},  // NCHW (inner > 1)
    {{6, 10}, Granularity::kChannel, 0},       // channel axis 0
    {{33, 17}, Granularity::kTensor, 0},      {{9, 12}, Granularity::kToken, 0},
    {{2, 3, 8}, Granularity::kChannel, -1},
};

INSTANTIATE_TEST_SUITE_P(Sweep, FakeQuantSweep,
                         ::testing::Combine(::testing::ValuesIn(kCases),
                                            ::testing::Values(2, 3, 4, 8, 0), ::testing::Bool(),
                                            ::testing::Values(DType::kFloat32, DType::kBFloat16,
                                                              DType::kFloat16)));

QuantParams Uniform(const float* scale, int bits, bool is_signed) {
  QuantParams p;
  p.scale = scale;
  p.uniform_bits = bits;
  p.is_signed = is_signed;
  return p;
}

TEST(FakeQuant, ErrorLessThanHalfStepInsideRange) {
  const std::vector<float> x = testing::RandomValues(4096, 3, 1.0f);
  std::vector<float> y(x.size());
  const float scale = 0.05f;  // 8-bit signed range is [-6.4, 6.35]
  const GroupLayout layout{1, 1, 4096};
  ASSERT_TRUE(
      FakeQuantForward({}, DType::kFloat32, layout, Uniform(&scale, 8, true), x.data(), y.data())
          .ok());
  for (size_t i = 0; i < x.size(); ++i) EXPECT_LE(std::fabs(y[i] - x[i]), scale / 2 * 1.0001f) << i;
}

TEST(FakeQuant, SaturatesAtRangeEnds) {
  const std::vector<float> x = {100.0f, -100.0f, std::numeric_limits<float>::infinity(),
                                -std::numeric_limits<float>::infinity()};
  std::vector<float> y(x.size());
  const float scale = 0.5f;
  ASSERT_TRUE(FakeQuantForward({}, DType::kFloat32, GroupLayout{1, 1, 4}, Uniform(&scale, 4, true),
                               x.data(), y.data())
                  .ok());
  EXPECT_EQ(y[0], 7 * 0.5f);
  EXPECT_EQ(y[1], -8 * 0.5f);
  EXPECT_EQ(y[2], 7 * 0.5f);
  EXPECT_EQ(y[3], -8 * 0.5f);
}

TEST(FakeQuant, NanPropagates) {
  const std::vector<float> x = {std::numeric_limits<float>::quiet_NaN()};
  std::vector<float> y(1);
  const float scale = 1.0f;
  ASSERT_TRUE(FakeQuantForward({}, DType::kFloat32, GroupLayout{1, 1, 1}, Uniform(&scale, 8, false),
                               x.data(), y.data())
                  .ok());
  EXPECT_TRUE(std::isnan(y[0]));
}

TEST(FakeQuant, TiesRoundToEven) {
  const std::vector<float> x = {0.5f, 1.5f, 2.5f, -0.5f, -1.5f};
  std::vector<float> y(x.size());
  const float scale = 1.0f;
  ASSERT_TRUE(FakeQuantForward({}, DType::kFloat32, GroupLayout{1, 1, 5}, Uniform(&scale, 8, true),
                               x.data(), y.data())
                  .ok());
  EXPECT_EQ(y, (std::vector<float>{0.0f, 2.0f, 2.0f, -0.0f, -2.0f}));
}

TEST(FakeQuant, EmptyTensorIsANoOp) {
  const float scale = 1.0f;
  EXPECT_TRUE(FakeQuantForward({}, DType::kFloat32, GroupLayout{0, 4, 1}, Uniform(&scale, 8, true),
                               nullptr, nullptr)
                  .ok());
}

TEST(FakeQuant, RejectsBadArguments) {
  const float scale = 1.0f;
  float x = 1.0f, y = 0.0f;
  EXPECT_EQ(
      FakeQuantForward({}, DType::kFloat32, GroupLayout{1, 1, 1}, Uniform(&scale, 0, true), &x, &y)
          .code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      FakeQuantForward({}, DType::kFloat32, GroupLayout{1, 1, 1}, Uniform(&scale, 9, true), &x, &y)
          .code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      FakeQuantForward({}, DType::kFloat32, GroupLayout{1, 1, 1}, Uniform(nullptr, 8, true), &x, &y)
          .code(),
      absl::StatusCode::kInvalidArgument);
  const uint8_t bad_bits = 0;
  QuantParams p = Uniform(&scale, 8, true);
  p.bits = &bad_bits;
  EXPECT_EQ(FakeQuantForward({}, DType::kFloat32, GroupLayout{1, 1, 1}, p, &x, &y).code(),
            absl::StatusCode::kInvalidArgument);
  if (!CudaKernelsBuilt()) {
    EXPECT_EQ(FakeQuantForward(ExecContext{Device::kCuda}, DType::kFloat32, GroupLayout{1, 1, 1},
                               Uniform(&scale, 8, true), &x, &y)
                  .code(),
              absl::StatusCode::kFailedPrecondition);
  }
}

TEST(GroupLayout, CoversGranularities) {
  auto per_channel = MakeGroupLayout({2, 3, 4, 5}, Granularity::kChannel, 1);
  ASSERT_TRUE(per_channel.ok());
  EXPECT_EQ(per_channel->outer, 2);
  EXPECT_EQ(per_channel->groups, 3);
  EXPECT_EQ(per_channel->inner, 20);
  auto last = MakeGroupLayout({2, 3, 4, 5}, Granularity::kChannel, -1);
  ASSERT_TRUE(last.ok());
  EXPECT_EQ(last->groups, 5);
  EXPECT_EQ(last->inner, 1);
  auto token = MakeGroupLayout({2, 3, 4}, Granularity::kToken, 0);
  ASSERT_TRUE(token.ok());
  EXPECT_EQ(token->groups, 6);
  EXPECT_EQ(token->inner, 4);
  EXPECT_FALSE(MakeGroupLayout({2, 3}, Granularity::kChannel, 2).ok());
  EXPECT_FALSE(MakeGroupLayout({2, -3}, Granularity::kTensor, 0).ok());
  EXPECT_FALSE(MakeGroupLayout({int64_t{1} << 40, int64_t{1} << 40}, Granularity::kTensor, 0).ok());
}

TEST(HostDType, HalfConversionsRoundTripAndRoundToNearestEven) {
  using detail::FloatToHalf;
  using detail::HalfToFloat;
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = HalfToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(FloatToHalf(f), h) << std::hex << h;
  }
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00);            // rounds to Inf
  EXPECT_EQ(FloatToHalf(1.0f + 1.0f / 2048), 0x3c00);  // tie to even
  EXPECT_EQ(FloatToHalf(1.0f + 3.0f / 2048), 0x3c02);
  EXPECT_EQ(detail::FloatToBFloat16(1.0f + 1.0f / 256), 0x3f80);  // tie to even
}

}  // namespace
}  // namespace splitq::kernels
