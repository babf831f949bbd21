// Tests for kernels/lsq_backward.h (CPU path): per-element gradients and per-group sums
// against the formulas, determinism across thread counts, and argument errors.
#include "kernels/lsq_backward.h"

#include <gtest/gtest.h>

#include "tests/kernels/test_util.h"

namespace splitq::kernels {
namespace {

struct Sums {
  std::vector<float> dx, gs, gb;
};

Sums RunBackward(const GroupLayout& layout, const QuantParams& p, const std::vector<float>& x,
                 const std::vector<float>& dy, int threads) {
  const ExecContext ctx{Device::kCpu, nullptr, threads};
  std::vector<uint8_t> ws(LsqBackwardWorkspaceBytes(ctx, layout));
  Sums s{std::vector<float>(x.size()), std::vector<float>(layout.groups),
         std::vector<float>(layout.groups)};
  const absl::Status st = LsqBackward(ctx, DType::kFloat32, layout, p, x.data(), dy.data(),
                                      s.dx.data(), s.gs.data(), s.gb.data(), ws.data(), ws.size());
  EXPECT_TRUE(st.ok()) << st;
  return s;
}

class LsqBackwardLayouts : public ::testing::TestWithParam<GroupLayout> {};

TEST_P(LsqBackwardLayouts, MatchesFormulas) {
  const GroupLayout layout = GetParam();
  const int64_t n = layout.numel();
  std::vector<float> scale(layout.groups), offset(layout.groups);
  for (int64_t g = 0; g < layout.groups; ++g) {
    scale[g] = 0.05f + 0.01f * static_cast<float>(g % 7);
    offset[g] = 0.1f * static_cast<float>(g % 3) - 0.1f;
  }
  const std::vector<float> x = testing::RandomValues(static_cast<size_t>(n), 11, 0.5f);
  const std::vector<float> dy = testing::RandomValues(static_cast<size_t>(n), 12, 1.0f);
  QuantParams p;
  p.scale = scale.data();
  p.offset = offset.data();
  p.uniform_bits = 4;
  p.is_signed = true;
  const Sums s = RunBackward(layout, p, x, dy, 0);
  std::vector<double> gs(layout.groups, 0.0), gb(layout.groups, 0.0);
  int64_t inside = 0, outside = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = (i / layout.inner) % layout.groups;
    const testing::RefQuant ref{scale[g], offset[g], 0.0f, 4, true};
    const float v = (x[i] - offset[g]) * (1.0f / scale[g]);
    const float r = ref.RawCode(x[i]);
    if (r < ref.qmin() || r > ref.qmax()) {
      ++outside;
      EXPECT_EQ(s.dx[i], 0.0f) << i;
      gs[g] += dy[i] * (r < ref.qmin() ? ref.qmin() : ref.qmax());
      gb[g] += dy[i];
    } else {
      ++inside;
      EXPECT_EQ(s.dx[i], dy[i]) << i;
      gs[g] += dy[i] * (r - v);
    }
  }
  EXPECT_GT(inside, 0);
  EXPECT_GT(outside, 0) << "the test data should exercise clipping";
  for (int64_t g = 0; g < layout.groups; ++g) {
    EXPECT_NEAR(s.gs[g], gs[g], 1e-4 * (1 + std::fabs(gs[g]))) << "group " << g;
    EXPECT_NEAR(s.gb[g], gb[g], 1e-4 * (1 + std::fabs(gb[g]))) << "group " << g;
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, LsqBackwardLayouts,
                         ::testing::Values(GroupLayout{512, 24, 1}, GroupLayout{3, 5, 1},
                                           GroupLayout{8, 6, 49}, GroupLayout{1, 1, 10000},
                                           GroupLayout{1, 40, 9000}));

// One thread and two threads give the same bits, on the channels-last path (inner == 1)
// and on the path that walks runs of 4096 elements of one group (inner > 1).
class LsqBackwardThreads : public ::testing::TestWithParam<GroupLayout> {};

TEST_P(LsqBackwardThreads, SameBitsWhateverTheThreadCount) {
  const GroupLayout layout = GetParam();
  std::vector<float> scale(layout.groups, 0.1f);
  const std::vector<float> x = testing::RandomValues(layout.numel(), 1, 1.0f);
  const std::vector<float> dy = testing::RandomValues(layout.numel(), 2, 1.0f);
  QuantParams p;
  p.scale = scale.data();
  p.uniform_bits = 3;
  p.is_signed = true;
  const Sums one = RunBackward(layout, p, x, dy, 1);
  const Sums two = RunBackward(layout, p, x, dy, 2);
  EXPECT_EQ(one.gs, two.gs);
  EXPECT_EQ(one.gb, two.gb);
  EXPECT_EQ(one.dx, two.dx);
}

INSTANTIATE_TEST_SUITE_P(Layouts, LsqBackwardThreads,
                         ::testing::Values(GroupLayout{1000, 64, 1}, GroupLayout{6, 5, 3000}));

TEST(LsqBackward, RejectsSmallWorkspace) {
  const GroupLayout layout{10, 4, 1};
  std::vector<float> scale(4, 0.1f), x(40, 0.0f), gs(4);
  QuantParams p;
  p.scale = scale.data();
  EXPECT_EQ(LsqBackward({}, DType::kFloat32, layout, p, x.data(), x.data(), x.data(), gs.data(),
                        nullptr, nullptr, 0)
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(LsqBackward, EmptyTensorGivesZeroSums) {
  const GroupLayout layout{0, 3, 1};
  std::vector<float> scale(3, 0.1f), gs(3, 7.0f), gb(3, 7.0f);
  QuantParams p;
  p.scale = scale.data();
  std::vector<uint8_t> ws(LsqBackwardWorkspaceBytes({}, layout));
  ASSERT_TRUE(LsqBackward({}, DType::kFloat32, layout, p, nullptr, nullptr, nullptr, gs.data(),
                          gb.data(), ws.data(), ws.size())
                  .ok());
  EXPECT_EQ(gs, std::vector<float>(3, 0.0f));
  EXPECT_EQ(gb, std::vector<float>(3, 0.0f));
}

}  // namespace
}  // namespace splitq::kernels
