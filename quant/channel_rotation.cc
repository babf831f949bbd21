#include "quant/channel_rotation.h"

#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <vector>

#include "kernels/rotate.h"
#include "quant/tensor_ops.h"

namespace splitq::quant {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// R x (R^T x with `inverse`) of a CPU float32 tensor along `axis`, with kernels/rotate.h's
// fast Walsh-Hadamard transform: log2(b) passes of adds an element instead of the b
// multiply-adds of the [b, b] matmul.
at::Tensor RotateOnCpu(const at::Tensor& x_in, int64_t axis, int64_t block, uint64_t seed,
                       bool inverse) {
  const at::Tensor x = x_in.contiguous();
  const kernels::GroupLayout layout =
      LayoutOf(x, Grouping{kernels::Granularity::kChannel, static_cast<int32_t>(axis)});
  at::Tensor y = at::empty_like(x);
  CheckOk(kernels::RotateChannels(layout, block, seed, inverse, x.data_ptr<float>(),
                                  y.data_ptr<float>()));
  return y;
}

// The same with autograd: the gradient of R x is R^T applied to the incoming gradient, and of
// R^T y, R applied to it.
struct RotateFunction : public torch::autograd::Function<RotateFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t axis, int64_t block,
                            int64_t seed, bool inverse) {
    ctx->saved_data["axis"] = axis;
    ctx->saved_data["block"] = block;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["inverse"] = inverse;
    return RotateOnCpu(x, axis, block, static_cast<uint64_t>(seed), inverse);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Through apply, so that a graph of the backward (create_graph) is recorded too.
    const at::Tensor g = RotateFunction::apply(
        grads[0], ctx->saved_data["axis"].toInt(), ctx->saved_data["block"].toInt(),
        ctx->saved_data["seed"].toInt(), !ctx->saved_data["inverse"].toBool());
    return {g, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

ChannelRotation::ChannelRotation(int64_t channels, int64_t block, uint64_t seed)
    : channels_(channels), seed_(seed) {
  if (block <= 1 || channels <= 1) return;
  int64_t b = 1;
  while (b * 2 <= block && channels % (b * 2) == 0) b *= 2;
  if (b <= 1) return;
  block_ = b;
  std::vector<float> signs(static_cast<size_t>(channels));
  for (int64_t c = 0; c < channels; ++c) signs[c] = kernels::RotationSign(seed, c);
  signs_ = at::tensor(signs, at::kFloat).view({channels / b, b});
  std::vector<float> h(static_cast<size_t>(b * b));
  const float norm = 1.0f / std::sqrt(static_cast<float>(b));
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t j = 0; j < b; ++j) {
      h[i * b + j] = (__builtin_popcountll(static_cast<uint64_t>(i & j)) & 1) ? -norm : norm;
    }
  }
  hadamard_ = at::tensor(h, at::kFloat).view({b, b});
}

at::Tensor ChannelRotation::Apply(const at::Tensor& x, int64_t axis, bool inverse) const {
  if (!enabled()) return x;
  const int64_t dim = axis < 0 ? axis + x.dim() : axis;
  TORCH_CHECK(dim >= 0 && dim < x.dim() && x.size(dim) == channels_, "rotation of ", channels_,
              " channels given a tensor of shape ", x.sizes(), " along dimension ", axis);
  if (x.device().is_cpu() && x.scalar_type() == at::kFloat && !force_matmul_) {
    return RotateFunction::apply(x, dim, block_, static_cast<int64_t>(seed_), inverse);
  }
  const at::Tensor last = x.movedim(axis, -1);
  std::vector<int64_t> shape = last.sizes().vec();
  std::vector<int64_t> blocks = shape;
  blocks.back() = channels_ / block_;
  blocks.push_back(block_);
  const at::Tensor s = signs_.to(x.device(), x.scalar_type());
  const at::Tensor h = hadamard_.to(x.device(), x.scalar_type());
  // Per block, as row vectors: forward y = (x * s) H / sqrt(b); inverse x = (y H / sqrt(b)) * s
  // (H symmetric).
  at::Tensor v = last.reshape(blocks);
  v = inverse ? at::matmul(v, h) * s : at::matmul(v * s, h);
  return v.reshape(shape).movedim(-1, axis);
}

at::Tensor ChannelRotation::Forward(const at::Tensor& x, int64_t axis) const {
  return Apply(x, axis, false);
}

at::Tensor ChannelRotation::Inverse(const at::Tensor& y, int64_t axis) const {
  return Apply(y, axis, true);
}

}  // namespace splitq::quant
