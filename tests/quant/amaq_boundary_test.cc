// Tests for quant/amaq_boundary.h: the budget projection, the gate and range gradients
// (sign against the task, size against finite differences of the straight-through
// surrogate), the regulariser, and forward == what the wire decodes.
#include "quant/amaq_boundary.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "quant/lsq_quantizer.h"
#include "quant/wire_codec.h"

namespace splitq::quant {
namespace {

TEST(ProjectBits, NeverExceedsTheTargetForRandomGates) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> bdist(2.0f, 8.0f);
  std::uniform_real_distribution<double> tdist(2.0, 8.0);
  for (int trial = 0; trial < 2000; ++trial) {
    const int channels = 1 + static_cast<int>(rng() % 300);
    std::vector<float> b(channels);
    for (auto& v : b) v = bdist(rng);
    const double target = tdist(rng);
    auto k = ProjectBits(b, 2, 8, target);
    ASSERT_TRUE(k.ok()) << k.status();
    const double mean = std::accumulate(k->begin(), k->end(), 0.0) / channels;
    ASSERT_LE(mean, target + 1e-9) << "trial " << trial;
    for (size_t c = 0; c < b.size(); ++c) {
      ASSERT_GE((*k)[c], 2);
      ASSERT_LE((*k)[c], 8);
      ASSERT_LE((*k)[c], std::nearbyint(b[c]));  // projection only removes bits
    }
  }
}

TEST(ProjectBits, LowestGateGivesUpBitsFirstAndRoundingIsKeptWhenWithinBudget) {
  auto k = ProjectBits({7.9f, 4.2f, 6.1f}, 2, 8, 6.0);  // rounds to 8,4,6 = mean 6
  ASSERT_TRUE(k.ok());
  EXPECT_EQ(*k, (std::vector<uint8_t>{8, 4, 6}));
  k = ProjectBits({7.9f, 4.2f, 6.1f}, 2, 8, 5.0);  // needs 3 bits removed: from channel 1
  ASSERT_TRUE(k.ok());
  EXPECT_EQ(*k, (std::vector<uint8_t>{8, 2, 5}));
  EXPECT_EQ(ProjectBits({5.0f}, 3, 8, 2.5).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ProjectBits, EdgeTargets) {
  const std::vector<float> b = {7.6f, 3.2f, 5.5f};
  for (double bad : {std::nan(""), HUGE_VAL, -HUGE_VAL}) {
    EXPECT_EQ(ProjectBits(b, 2, 8, bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  auto above = ProjectBits(b, 2, 8, 1e300);  // does not bind
  ASSERT_TRUE(above.ok());
  EXPECT_EQ(*above, (std::vector<uint8_t>{8, 3, 6}));
  // Just under an integer mean: the guarantee is strict, so one more bit goes.
  auto under = ProjectBits({4.0f, 4.0f, 4.0f}, 2, 8, 4.0 - 1e-9);
  ASSERT_TRUE(under.ok());
  EXPECT_LE(std::accumulate(under->begin(), under->end(), 0.0) / 3, 4.0 - 1e-9);
}

// A budget in coded bits: the priced mean meets the target for random gates and prices
// whenever the channels that cost something can reach it; bits only go; channels that cost
// nothing keep theirs; the lowest gate among the priced gives up bits first.
TEST(ProjectPricedBits, MeetsTheTargetWhereItCanAndKeepsFreeChannels) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> bdist(1.0f, 8.0f), pdist(0.0f, 1.2f);
  std::uniform_real_distribution<double> tdist(0.2, 8.0);
  int reachable = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    const int channels = 1 + static_cast<int>(rng() % 200);
    std::vector<float> b(channels), price(channels);
    for (auto& v : b) v = bdist(rng);
    for (auto& p : price) p = rng() % 5 == 0 ? 0.0f : pdist(rng);
    const double target = tdist(rng);
    auto k = ProjectPricedBits(b, 1, 8, target, price);
    ASSERT_TRUE(k.ok()) << k.status();
    double cost = 0, floor = 0;
    for (int c = 0; c < channels; ++c) {
      const int rounded = std::clamp(static_cast<int>(std::nearbyint(b[c])), 1, 8);
      ASSERT_GE((*k)[c], 1);
      ASSERT_LE((*k)[c], rounded);
      if (price[c] == 0) {
        ASSERT_EQ((*k)[c], rounded) << "trial " << trial;
      }
      cost += price[c] * (*k)[c];
      floor += price[c] * 1;
    }
    if (floor <= target * channels) {
      ++reachable;
      ASSERT_LE(cost, target * channels + 1e-3) << "trial " << trial;
    }
  }
  EXPECT_GT(reachable, 1000);
  // Prices 0.25, 1, 0.5 at 8, 4, 6 bits: 2 + 4 + 3 = 9 (mean 3). A mean of 2.5 (7.5) takes
  // 1.5 from channel 1 (the lowest gate): two bits of price 1 -> 2, 4, 6 -> 7 <= 7.5.
  auto k = ProjectPricedBits({7.9f, 4.2f, 6.1f}, 2, 8, 2.5, {0.25f, 1.0f, 0.5f});
  ASSERT_TRUE(k.ok());
  EXPECT_EQ(*k, (std::vector<uint8_t>{8, 2, 6}));
  // Out of reach: every priced channel at bmin, the result over the target.
  k = ProjectPricedBits({7.9f, 4.2f}, 2, 8, 0.5, {1.0f, 1.0f});
  ASSERT_TRUE(k.ok());
  EXPECT_EQ(*k, (std::vector<uint8_t>{2, 2}));
  EXPECT_EQ(ProjectPricedBits({5.0f}, 2, 8, 3.0, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ProjectPricedBits({5.0f}, 2, 8, 3.0, {-1.0f}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ProjectPricedBits({5.0f}, 2, 8, 0.0, {1.0f}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// With a code price, forward() projects on the priced mean and the regulariser's B-bar is the
// priced mean of b: a channel that costs half as much per bit is pushed half as hard.
TEST(AmaqBoundary, CodePriceDrivesTheProjectionAndTheRegulariser) {
  AmaqOptions opt;
  opt.channel_axis = 1;
  AmaqBoundary boundary(opt, 2);
  const at::Tensor x = at::randn({64, 2});
  boundary->forward(x, 8.0);
  boundary->set_code_price({0.5f, 1.0f});  // 8 bits each: priced mean (4 + 8) / 2 = 6
  boundary->forward(x, 6.0);
  EXPECT_EQ(boundary->last_bits(), (std::vector<uint8_t>{8, 8}));
  boundary->forward(x, 5.0);  // 2 priced bits per channel over: ties go to channel 0 first
  const std::vector<uint8_t> bits = boundary->last_bits();
  EXPECT_LE(0.5 * bits[0] + 1.0 * bits[1], 2 * 5.0);
  const at::Tensor reg = BitRegularization({boundary}, 0.0, 1.0, 1.0);
  const auto grads = torch::autograd::grad({reg}, {boundary->gate()});
  EXPECT_NEAR(grads[0][0].item<double>() / grads[0][1].item<double>(), 0.5, 1e-4);
  EXPECT_THROW(boundary->set_code_price({1.0f}), c10::Error);
  boundary->set_code_price({});
  EXPECT_FALSE(boundary->code_price_tensor().defined());
}

// F(r, b, m) = sum w * (s(b) * (clamp((x - m + r) / s(b), 0, qmax) + delta) + m - r),
// s(b) = 2r/(2^b - 1): the straight-through surrogate (delta, the rounding, held fixed).
double AmaqSurrogate(const std::vector<double>& x, const std::vector<double>& w,
                     const std::vector<double>& delta, double r, double b, double qmax,
                     double m = 0) {
  const double s = 2 * r / (std::exp2(b) - 1);
  double f = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    double v = (x[i] - m + r) / s;
    v = v < 0 ? 0 : (v > qmax ? qmax : v);
    f += w[i] * (s * (v + delta[i]) + m - r);
  }
  return f;
}

TEST(AmaqBoundary, RangeCentreAndBitGradientsMatchFiniteDifferencesOfTheSurrogate) {
  AmaqOptions opt;
  opt.channel_axis = 1;
  AmaqBoundary boundary(opt, 1);
  const int n = 3000;
  std::mt19937 rng(9);
  std::normal_distribution<double> dist(0.0, 0.5);
  std::vector<float> xs;
  const double r0 = 1.0;
  const int k = 4;
  const double qmax = 15, s0 = 2 * r0 / qmax;
  while (static_cast<int>(xs.size()) < n) {
    const double x = dist(rng);
    const double v = (x + r0) / s0;
    if ((v > qmax - 0.01 && v < qmax + 0.6) || (v < 0.01 && v > -0.6)) continue;
    if (std::fabs(v - std::nearbyint(v)) > 0.49) continue;
    xs.push_back(static_cast<float>(x));
  }
  const at::Tensor x = at::tensor(xs).reshape({n, 1});
  const at::Tensor w = at::randn({n, 1});
  {
    at::NoGradGuard no_grad;
    boundary->range().fill_(r0);
    boundary->gate().fill_(0.0);  // b = 5 at alpha 2, bits 2..8
  }
  boundary->forward(x, 8.0);  // initialises (sets the range to [min, max]); reset below
  {
    at::NoGradGuard no_grad;
    boundary->range().fill_(r0);
    boundary->center().fill_(0.0);
  }
  const at::Tensor b = boundary->continuous_bits();
  // Choose the gate so that b rounds to k = 4 (target 4 forces it via the projection too).
  const at::Tensor y = boundary->forward(x, static_cast<double>(k));
  ASSERT_EQ(boundary->last_bits()[0], k);
  const auto grads = torch::autograd::grad(
      {(y * w).sum()}, {boundary->range(), boundary->gate(), boundary->center()});
  const double g = 1.0 / std::sqrt(n * qmax);

  std::vector<double> xd(xs.begin(), xs.end()), wd, delta;
  for (int i = 0; i < n; ++i) {
    wd.push_back(w[i][0].item<float>());
    double v = (xd[i] + r0) / s0;
    v = v < 0 ? 0 : (v > qmax ? qmax : v);
    delta.push_back(std::nearbyint(v) - v);
  }
  const double h = 1e-6;
  const double fd_r = (AmaqSurrogate(xd, wd, delta, r0 + h, k, qmax) -
                       AmaqSurrogate(xd, wd, delta, r0 - h, k, qmax)) /
                      (2 * h);
  const double fd_b = (AmaqSurrogate(xd, wd, delta, r0, k + h, qmax) -
                       AmaqSurrogate(xd, wd, delta, r0, k - h, qmax)) /
                      (2 * h);
  EXPECT_NEAR(grads[0].item<double>() / g, fd_r, 1e-3 * (1 + std::fabs(fd_r)));
  // Gate: d/dQ = d/db * (bmax - bmin) * alpha * sigma'(alpha Q).
  const double sig = 1.0 / (1.0 + std::exp(-opt.alpha * boundary->gate()[0].item<double>()));
  const double db_dq = (opt.bmax - opt.bmin) * opt.alpha * sig * (1 - sig);
  EXPECT_NEAR(grads[1].item<double>() / (g * db_dq), fd_b, 1e-3 * (1 + std::fabs(fd_b)));
  // Centre: only clipped elements move with it.
  const double fd_m = (AmaqSurrogate(xd, wd, delta, r0, k, qmax, h) -
                       AmaqSurrogate(xd, wd, delta, r0, k, qmax, -h)) /
                      (2 * h);
  EXPECT_NEAR(grads[2].item<double>() / g, fd_m, 1e-3 * (1 + std::fabs(fd_m)));
  (void)b;
}

TEST(AmaqBoundary, GateGradientAsksForMoreBitsWhenTheTaskIsReconstruction) {
  AmaqOptions opt;
  opt.channel_axis = 1;
  AmaqBoundary boundary(opt, 8);
  const at::Tensor x = at::randn({512, 8});
  boundary->forward(x, 8.0);  // initialise the range to [min, max]
  const at::Tensor y = boundary->forward(x, 3.0);
  const at::Tensor loss = (y - x).square().sum();
  const auto grads = torch::autograd::grad({loss}, {boundary->gate()});
  // More bits lower the reconstruction error, so descending the gradient raises the gates.
  EXPECT_TRUE((grads[0] < 0).all().item<bool>()) << grads[0];
}

TEST(AmaqBoundary, RegulariserPushesBitsDownWhenOverBudget) {
  AmaqOptions opt;
  AmaqBoundary a(opt, 4), b(opt, 6);
  const at::Tensor reg = BitRegularization({a, b}, 1e-3, 1.0, 3.0);
  const auto grads = torch::autograd::grad({reg}, {a->gate(), b->gate()});
  EXPECT_TRUE((grads[0] > 0).all().item<bool>());
  EXPECT_TRUE((grads[1] > 0).all().item<bool>());
  EXPECT_GT(reg.item<double>(), 0.0);
}

TEST(AmaqBoundary, BudgetHoldsAndForwardEqualsWhatTheWireDecodes) {
  AmaqOptions opt;
  opt.channel_axis = 1;
  AmaqBoundary boundary(opt, 16);
  const at::Tensor x = at::randn({4, 16, 5, 5});
  for (double target : {8.0, 6.5, 4.0, 3.0, 2.0}) {
    const at::Tensor y = boundary->forward(x, target);
    const auto& bits = boundary->last_bits();
    const double mean = std::accumulate(bits.begin(), bits.end(), 0.0) / bits.size();
    EXPECT_LE(mean, target);
    WireEncoder enc(1, FrameKind::kActivation, WireEncoderOptions{1});
    WireDecoder dec;
    auto frame = enc.Encode(x, 0, bits, boundary->wire_scales(), boundary->wire_offsets());
    ASSERT_TRUE(frame.ok()) << frame.status();
    auto decoded = dec.Decode(*frame);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_TRUE(at::equal(*decoded, y.detach())) << "target " << target;
  }
}

}  // namespace
}  // namespace splitq::quant
