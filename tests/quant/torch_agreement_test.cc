// Agreement with PyTorch's own fake-quant ops where the semantics coincide:
// fake_quantize_per_channel_affine (values) and _fake_quantize_learnable_per_channel_affine
// (values and gradients of x, scale and zero point).
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include "quant/lsq_quantizer.h"

namespace splitq::quant {
namespace {

struct Range {
  int bits;
  bool is_signed;
};

class TorchAgreement : public ::testing::TestWithParam<Range> {};

TEST_P(TorchAgreement, PerChannelFakeQuantMatchesExactly) {
  const Range r = GetParam();
  at::manual_seed(1);
  const at::Tensor x = at::randn({257, 19}) * 3;
  const at::Tensor scale = at::rand({19}) * 0.2 + 0.01;
  const int qmin = kernels::QMin(r.bits, r.is_signed), qmax = kernels::QMax(r.bits, r.is_signed);
  const at::Tensor zp = at::randint(qmin, qmax + 1, {19}, at::kInt);
  QuantTensors q;
  q.scale = scale;
  q.zero_point = zp.to(at::kFloat);
  q.uniform_bits = r.bits;
  q.is_signed = r.is_signed;
  const at::Tensor ours = FakeQuantize(x, Grouping{kernels::Granularity::kChannel, 1}, q);
  const at::Tensor theirs = at::fake_quantize_per_channel_affine(x, scale, zp, 1, qmin, qmax);
  EXPECT_EQ((ours != theirs).sum().item<int64_t>(), 0);
}

TEST_P(TorchAgreement, LearnablePerChannelValuesAndGradients) {
  const Range r = GetParam();
  at::manual_seed(2);
  const int64_t rows = 300, cols = 7;
  const at::Tensor x0 = at::randn({rows, cols}) * 2;
  const at::Tensor s0 = at::rand({cols}) * 0.2 + 0.05;
  const at::Tensor dy = at::randn({rows, cols});
  const int qmin = kernels::QMin(r.bits, r.is_signed), qmax = kernels::QMax(r.bits, r.is_signed);
  const double g = LsqGradScale(rows, qmax);

  LsqOptions opt;
  opt.bits = r.bits;
  opt.is_signed = r.is_signed;
  opt.grouping = Grouping{kernels::Granularity::kChannel, 1};
  const at::Tensor x = x0.clone().requires_grad_(true);
  const at::Tensor s = s0.clone().requires_grad_(true);
  const at::Tensor beta = at::zeros({cols}).requires_grad_(true);
  const at::Tensor y = LsqFakeQuant(x, s, beta, opt);
  const auto grads = torch::autograd::grad({y}, {x, s, beta}, {dy});

  const at::Tensor xt = x0.clone().requires_grad_(true);
  const at::Tensor st = s0.clone().requires_grad_(true);
  const at::Tensor zt = at::zeros({cols}).requires_grad_(true);
  const at::Tensor yt =
      at::_fake_quantize_learnable_per_channel_affine(xt, st, zt, 1, qmin, qmax, g);
  const auto tgrads = torch::autograd::grad({yt}, {xt, st, zt}, {dy});

  EXPECT_TRUE(at::equal(y, yt));
  EXPECT_TRUE(at::equal(grads[0], tgrads[0]));
  EXPECT_TRUE(at::allclose(grads[1], tgrads[1], 1e-4, 1e-5)) << grads[1] << "\nvs\n" << tgrads[1];
  // d/d zero_point = -s * d/d beta.
  EXPECT_TRUE(at::allclose(-s0 * grads[2], tgrads[2], 1e-4, 1e-5)) << -s0 * grads[2] << "\nvs\n"
                                                                   << tgrads[2];
}

INSTANTIATE_TEST_SUITE_P(Ranges, TorchAgreement,
                         ::testing::Values(Range{8, true}, Range{4, false}, Range{3, true},
                                           Range{2, false}));

}  // namespace
}  // namespace splitq::quant
