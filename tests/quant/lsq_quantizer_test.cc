// Tests for quant/lsq_quantizer.h: LSQ / LSQ+ gradients against finite differences, the
// initialisation rule, and the module's parameters.
//
// The LSQ gradient is a straight-through estimate, so it is the exact derivative of the
// surrogate in which each element's rounding residual delta = rint(c) - c (c the clamped
// scaled value) is frozen:
//   F(s, beta) = sum_i w_i * (s * (clamp((x_i - beta) / s, qmin, qmax) + delta_i) + beta).
// Finite differences of F (in double) check the kernel's arithmetic: signs, the in/out of
// range split, and the gradient scale.
#include "quant/lsq_quantizer.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <random>

namespace splitq::quant {
namespace {

struct Surrogate {
  std::vector<double> x, w, delta;
  double qmin, qmax;

  static double Clamp(double v, double lo, double hi) { return v < lo ? lo : (v > hi ? hi : v); }
  double Eval(double s, double beta) const {
    double f = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      f += w[i] * (s * (Clamp((x[i] - beta) / s, qmin, qmax) + delta[i]) + beta);
    }
    return f;
  }
};

// Values whose scaled form stays out of the half-step bands just outside the range, where
// "in range" by rounded code (PyTorch's rule, ours) and by clamp differ.
std::vector<float> SafeValues(int n, double s, double beta, double qmin, double qmax, int seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> dist(0.0, (qmax - qmin) * s * 0.45);
  std::vector<float> out;
  while (static_cast<int>(out.size()) < n) {
    const double x = dist(rng) + beta;
    const double v = (x - beta) / s;
    if ((v > qmax - 0.01 && v < qmax + 0.6) || (v < qmin + 0.01 && v > qmin - 0.6)) continue;
    if (std::fabs(v - std::nearbyint(v)) > 0.49) continue;  // keep rounding away from ties
    out.push_back(static_cast<float>(x));
  }
  return out;
}

TEST(LsqQuantizer, ScaleAndOffsetGradientsMatchFiniteDifferences) {
  const int bits = 3;
  const bool is_signed = true;
  const double qmin = kernels::QMin(bits, is_signed), qmax = kernels::QMax(bits, is_signed);
  const double s0 = 0.3, beta0 = 0.2;
  const int n = 2000;
  const std::vector<float> xs = SafeValues(n, s0, beta0, qmin, qmax, 5);
  const at::Tensor x = at::tensor(xs).reshape({n, 1});
  // Its own generator state (not whatever earlier tests left), and a positive mean, so that
  // the clipped elements' weights cannot cancel out (the last check below).
  at::manual_seed(12);
  const at::Tensor w = at::randn({n, 1}) + 0.5;
  LsqOptions opt;
  opt.bits = bits;
  opt.is_signed = is_signed;
  opt.learn_offset = true;
  opt.grouping = Grouping{kernels::Granularity::kTensor, 0};
  const at::Tensor s = at::full({1}, s0).requires_grad_(true);
  const at::Tensor beta = at::full({1}, beta0).requires_grad_(true);
  const at::Tensor y = LsqFakeQuant(x, s, beta, opt);
  const auto grads = torch::autograd::grad({(y * w).sum()}, {s, beta});
  const double g = LsqGradScale(n, static_cast<int>(qmax));

  Surrogate f{{}, {}, {}, qmin, qmax};
  for (int i = 0; i < n; ++i) {
    f.x.push_back(xs[i]);
    f.w.push_back(w[i][0].item<float>());
    const double c = Surrogate::Clamp((xs[i] - beta0) / s0, qmin, qmax);
    f.delta.push_back(std::nearbyint(c) - c);
  }
  const double h = 1e-6;
  const double fd_s = (f.Eval(s0 + h, beta0) - f.Eval(s0 - h, beta0)) / (2 * h);
  const double fd_b = (f.Eval(s0, beta0 + h) - f.Eval(s0, beta0 - h)) / (2 * h);
  EXPECT_NEAR(grads[0].item<double>() / g, fd_s, 1e-3 * (1 + std::fabs(fd_s)));
  EXPECT_NEAR(grads[1].item<double>() / g, fd_b, 1e-3 * (1 + std::fabs(fd_b)));
  EXPECT_GT(std::fabs(fd_b), 1.0) << "the data should clip some elements";
}

TEST(LsqQuantizer, InitialisesStepFromData) {
  LsqOptions opt;
  opt.bits = 4;
  opt.is_signed = true;
  opt.grouping = Grouping{kernels::Granularity::kChannel, 1};
  LsqQuantizer q(opt, 3);
  const at::Tensor x = at::randn({100, 3});
  EXPECT_FALSE(q->initialized());
  q->forward(x);
  EXPECT_TRUE(q->initialized());
  const at::Tensor expected = x.abs().mean(0) * 2.0 / std::sqrt(7.0);
  EXPECT_TRUE(at::allclose(q->scale().detach(), expected, 1e-5, 1e-7));
}

TEST(LsqQuantizer, GradientsReachTheModuleParameters) {
  LsqOptions opt;
  opt.bits = 4;
  opt.learn_offset = true;
  opt.grouping = Grouping{kernels::Granularity::kChannel, 0};
  LsqQuantizer q(opt, 5);
  const at::Tensor x = at::randn({5, 64}).requires_grad_(true);
  q->forward(x).square().sum().backward();
  EXPECT_EQ(q->parameters().size(), 2u);
  EXPECT_TRUE(q->scale().grad().defined());
  EXPECT_TRUE(q->offset().grad().defined());
  EXPECT_GT(q->scale().grad().abs().sum().item<float>(), 0.0f);
  EXPECT_TRUE(x.grad().defined());
}

TEST(LsqQuantizer, RejectsPerTokenAndBadBits) {
  LsqOptions opt;
  opt.grouping = Grouping{kernels::Granularity::kToken, 0};
  EXPECT_THROW(LsqQuantizer(opt, 1), c10::Error);
  LsqOptions bad;
  bad.bits = 9;
  EXPECT_THROW(LsqQuantizer(bad, 1), c10::Error);
  LsqOptions one_signed_bit;
  one_signed_bit.bits = 1;
  one_signed_bit.is_signed = true;
  EXPECT_THROW(LsqQuantizer(one_signed_bit, 1), c10::Error);
  LsqOptions one_unsigned_bit = one_signed_bit;
  one_unsigned_bit.is_signed = false;
  LsqQuantizer ok(one_unsigned_bit, 1);
  const at::Tensor y = ok->forward(at::rand({1, 64}));
  EXPECT_TRUE(at::isfinite(y).all().item<bool>());
}

}  // namespace
}  // namespace splitq::quant
