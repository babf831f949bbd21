// quant/channel_rotation.h: the torch rotation equals kernels/rotate.h's (itself tested against
// the dense matrix), is undone by Inverse, keeps norms, and its autograd gradient is R^T.
#include "quant/channel_rotation.h"

#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <vector>

#include "kernels/rotate.h"

namespace splitq::quant {
namespace {

at::Tensor KernelRotate(const at::Tensor& x, int64_t axis, int64_t block, uint64_t seed,
                        bool inverse) {
  const at::Tensor c = x.contiguous();
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= c.size(d);
  for (int64_t d = axis + 1; d < c.dim(); ++d) inner *= c.size(d);
  at::Tensor y = at::empty_like(c);
  EXPECT_TRUE(kernels::RotateChannels(kernels::GroupLayout{outer, c.size(axis), inner}, block, seed,
                                      inverse, c.data_ptr<float>(), y.data_ptr<float>())
                  .ok());
  return y;
}

TEST(ChannelRotation, EqualsTheKernelInBothLayouts) {
  at::manual_seed(3);
  struct Case {
    std::vector<int64_t> shape;
    int64_t axis, block;
  };
  for (const Case& k : {Case{{2, 8, 3, 3}, 1, 8}, Case{{2, 8, 3, 3}, 1, 4}, Case{{5, 16}, 1, 16},
                        Case{{3, 4, 32}, 2, 8}}) {
    const at::Tensor x = at::randn(k.shape);
    // Both paths: the [b, b] matmul (what CUDA and other dtypes take) and, on CPU float32,
    // the kernel itself.
    for (const bool matmul : {true, false}) {
      ChannelRotation r(x.size(k.axis), k.block, 42);
      r.set_force_matmul(matmul);
      ASSERT_EQ(r.block(), k.block);
      EXPECT_TRUE(at::allclose(r.Forward(x, k.axis), KernelRotate(x, k.axis, k.block, 42, false),
                               1e-5, 1e-6));
      EXPECT_TRUE(at::allclose(r.Inverse(x, k.axis), KernelRotate(x, k.axis, k.block, 42, true),
                               1e-5, 1e-6));
      EXPECT_TRUE(at::allclose(r.Inverse(r.Forward(x, k.axis), k.axis), x, 1e-5, 1e-6));
      EXPECT_NEAR(r.Forward(x, k.axis).norm().item<double>(), x.norm().item<double>(), 1e-4);
      // A negative axis names the same dimension.
      EXPECT_TRUE(at::allclose(r.Forward(x, k.axis - x.dim()), r.Forward(x, k.axis), 1e-6, 1e-7));
    }
  }
  // float64 takes the matmul and agrees with the float32 kernel to float precision.
  const at::Tensor x = at::randn({4, 32});
  const ChannelRotation r(32, 16, 9);
  EXPECT_TRUE(at::allclose(r.Forward(x.to(at::kDouble), 1).to(at::kFloat),
                           KernelRotate(x, 1, 16, 9, false), 1e-5, 1e-6));
}

TEST(ChannelRotation, TheGradientIsTheInverse) {
  at::manual_seed(4);
  for (const bool matmul : {true, false}) {
    ChannelRotation r(16, 8, 7);
    r.set_force_matmul(matmul);
    const at::Tensor w = at::randn({3, 16, 2});
    at::Tensor x = at::randn({3, 16, 2}).requires_grad_(true);
    (r.Forward(x, 1) * w).sum().backward();
    EXPECT_TRUE(at::allclose(x.grad(), r.Inverse(w, 1), 1e-5, 1e-6)) << "matmul " << matmul;
    x = at::randn({3, 16, 2}).requires_grad_(true);
    (r.Inverse(x, 1) * w).sum().backward();
    EXPECT_TRUE(at::allclose(x.grad(), r.Forward(w, 1), 1e-5, 1e-6)) << "matmul " << matmul;
  }
}

// The backward is itself differentiable (create_graph): for y = R x, the gradient R^T v of
// an incoming gradient v has gradient R w with respect to v.
TEST(ChannelRotation, TheBackwardIsDifferentiable) {
  at::manual_seed(5);
  for (const bool matmul : {true, false}) {
    ChannelRotation r(16, 8, 3);
    r.set_force_matmul(matmul);
    const at::Tensor x = at::randn({3, 16}).requires_grad_(true);
    const at::Tensor v = at::randn({3, 16}).requires_grad_(true);
    const at::Tensor w = at::randn({3, 16});
    const at::Tensor g = torch::autograd::grad({r.Forward(x, 1)}, {x}, {v}, true, true)[0];
    (g * w).sum().backward();
    ASSERT_TRUE(v.grad().defined()) << "matmul " << matmul;
    EXPECT_TRUE(at::allclose(v.grad(), r.Forward(w, 1), 1e-5, 1e-6)) << "matmul " << matmul;
  }
}

// Both paths refuse a tensor whose channel count is not the rotation's.
TEST(ChannelRotation, RefusesAnotherChannelCount) {
  for (const bool matmul : {true, false}) {
    ChannelRotation r(64, 16, 1);
    r.set_force_matmul(matmul);
    EXPECT_THROW((void)r.Forward(at::randn({2, 32}), 1), c10::Error) << "matmul " << matmul;
  }
}

TEST(ChannelRotation, TheBlockFallsBackToAPowerOfTwoThatDivides) {
  EXPECT_EQ(ChannelRotation(12, 8, 0).block(), 4);
  EXPECT_EQ(ChannelRotation(64, 256, 0).block(), 64);
  EXPECT_FALSE(ChannelRotation(7, 8, 0).enabled());
  EXPECT_FALSE(ChannelRotation(64, 0, 0).enabled());
  const at::Tensor x = at::randn({2, 7});
  EXPECT_TRUE(ChannelRotation(7, 8, 0).Forward(x, 1).equal(x));
}

// A channel far larger than the rest (an outlier) is spread evenly over its block.
TEST(ChannelRotation, SpreadsAnOutlier) {
  at::Tensor x = at::zeros({1, 64});
  x[0][5] = 100.0;
  const at::Tensor y = ChannelRotation(64, 64, 1).Forward(x, 1);
  EXPECT_TRUE(at::allclose(y.abs(), at::full({1, 64}, 100.0 / 8.0), 1e-5, 1e-5));
}

}  // namespace
}  // namespace splitq::quant
