// kernels/rotate.h against a dense matrix: R = blockdiag(H_b diag(s)) / sqrt(b) built entry by
// entry from the definition, applied as a matrix product; the inverse is R^T, norms are kept,
// in place equals out of place, and bad blocks are refused.
#include "kernels/rotate.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

namespace splitq::kernels {
namespace {

// R[c][d] for `channels` channels in blocks of `block`.
std::vector<double> DenseRotation(int64_t channels, int64_t block, uint64_t seed) {
  std::vector<double> r(static_cast<size_t>(channels * channels), 0.0);
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t d = 0; d < channels; ++d) {
      if (c / block != d / block) continue;
      const uint64_t i = static_cast<uint64_t>(c % block), j = static_cast<uint64_t>(d % block);
      const double h = __builtin_popcountll(i & j) % 2 == 0 ? 1.0 : -1.0;
      r[static_cast<size_t>(c * channels + d)] =
          h * RotationSign(seed, d) / std::sqrt(static_cast<double>(block));
    }
  }
  return r;
}

struct Case {
  int64_t outer, channels, inner, block;
};

TEST(RotateChannelsTest, MatchesTheDenseMatrixAndItsTranspose) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const Case& k : {Case{3, 16, 5, 16}, Case{7, 32, 1, 8}, Case{2, 12, 9, 4}, Case{4, 8, 3, 1},
                        Case{1, 64, 1, 64}, Case{5, 24, 2, 2}}) {
    const GroupLayout layout{k.outer, k.channels, k.inner};
    const uint64_t seed = rng();
    std::vector<float> x(static_cast<size_t>(layout.numel()));
    for (float& v : x) v = normal(rng);
    x[0] = 40.0f;  // an outlier channel
    std::vector<float> y(x.size()), back(x.size());
    ASSERT_TRUE(RotateChannels(layout, k.block, seed, false, x.data(), y.data()).ok());
    const std::vector<double> r = DenseRotation(k.channels, k.block, seed);
    double norm_x = 0, norm_y = 0;
    for (int64_t o = 0; o < k.outer; ++o) {
      for (int64_t c = 0; c < k.channels; ++c) {
        for (int64_t i = 0; i < k.inner; ++i) {
          double want = 0;
          for (int64_t d = 0; d < k.channels; ++d) {
            want += r[static_cast<size_t>(c * k.channels + d)] *
                    x[static_cast<size_t>((o * k.channels + d) * k.inner + i)];
          }
          const size_t at = static_cast<size_t>((o * k.channels + c) * k.inner + i);
          ASSERT_NEAR(y[at], want, 1e-4 * (1 + std::fabs(want)))
              << "block " << k.block << " o " << o << " c " << c << " i " << i;
          norm_x += static_cast<double>(x[at]) * x[at];
          norm_y += static_cast<double>(y[at]) * y[at];
        }
      }
    }
    EXPECT_NEAR(norm_y, norm_x, 1e-5 * norm_x);
    ASSERT_TRUE(RotateChannels(layout, k.block, seed, true, y.data(), back.data()).ok());
    for (size_t e = 0; e < x.size(); ++e) ASSERT_NEAR(back[e], x[e], 1e-4 * (1 + std::fabs(x[e])));
    // In place gives the same bytes.
    std::vector<float> in_place = x;
    ASSERT_TRUE(
        RotateChannels(layout, k.block, seed, false, in_place.data(), in_place.data()).ok());
    EXPECT_EQ(in_place, y);
  }
}

// The outlier of one channel is spread over its block: after rotation no element of the block
// carries more than its share plus the others' noise.
TEST(RotateChannelsTest, SpreadsAnOutlierChannelOverItsBlock) {
  const GroupLayout layout{1, 64, 1};
  std::vector<float> x(64, 0.0f), y(64);
  x[5] = 64.0f;
  ASSERT_TRUE(RotateChannels(layout, 64, 11, false, x.data(), y.data()).ok());
  for (float v : y) EXPECT_NEAR(std::fabs(v), 8.0f, 1e-4f);  // 64 / sqrt(64)
}

TEST(RotateChannelsTest, RefusesBadBlocks) {
  std::vector<float> x(24, 1.0f);
  EXPECT_EQ(RotateChannels({1, 24, 1}, 6, 0, false, x.data(), x.data()).code(),
            absl::StatusCode::kInvalidArgument);  // not a power of two
  EXPECT_EQ(RotateChannels({1, 24, 1}, 16, 0, false, x.data(), x.data()).code(),
            absl::StatusCode::kInvalidArgument);  // does not divide 24
  EXPECT_EQ(RotateChannels({1, 24, 1}, 0, 0, false, x.data(), x.data()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(RotateChannels({0, 24, 1}, 8, 0, false, nullptr, nullptr).ok());  // nothing to do
}

}  // namespace
}  // namespace splitq::kernels
