#include "quant/channel_rotation.h"

#include <c10/core/DeviceGuard.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/rotate.h"
#include "quant/tensor_ops.h"

namespace splitq::quant {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// R x (R^T x with `inverse`) along `axis` with kernels/rotate.h's fast Walsh-Hadamard
// transform on x's device: log2(b) passes of adds an element instead of the b multiply-adds of
// the [b, b] matmul. sign_bits: the signs as bits on x's device (read by the CUDA path).
at::Tensor RotateWithKernel(const at::Tensor& x_in, int64_t axis, int64_t block, uint64_t seed,
                            bool inverse, const at::Tensor& sign_bits) {
  const at::Tensor x = x_in.contiguous();
  const kernels::GroupLayout layout =
      LayoutOf(x, Grouping{kernels::Granularity::kChannel, static_cast<int32_t>(axis)});
#if defined(SPLITQ_TORCH_CUDA)
  // The launch goes to the current device: make it x's (the stream is x's device's).
  const c10::OptionalDeviceGuard guard(x.device());
#endif
  at::Tensor y = at::empty_like(x);
  CheckOk(kernels::RotateChannels(ContextOf(x), ToKernelDType(x.scalar_type()), layout, block, seed,
                                  reinterpret_cast<const uint32_t*>(sign_bits.data_ptr()), inverse,
                                  x.data_ptr(), y.data_ptr()));
  return y;
}

// The same with autograd: the gradient of R x is R^T applied to the incoming gradient, and of
// R^T y, R applied to it.
struct RotateFunction : public torch::autograd::Function<RotateFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t axis, int64_t block,
                            int64_t seed, bool inverse, const at::Tensor& sign_bits) {
    ctx->saved_data["axis"] = axis;
    ctx->saved_data["block"] = block;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["inverse"] = inverse;
    ctx->saved_data["sign_bits"] = sign_bits;
    return RotateWithKernel(x, axis, block, static_cast<uint64_t>(seed), inverse, sign_bits);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Through apply, so that a graph of the backward (create_graph) is recorded too.
    const at::Tensor g = RotateFunction::apply(
        grads[0], ctx->saved_data["axis"].toInt(), ctx->saved_data["block"].toInt(),
        ctx->saved_data["seed"].toInt(), !ctx->saved_data["inverse"].toBool(),
        ctx->saved_data["sign_bits"].toTensor());
    return {g, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
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
  const std::vector<uint32_t> bits = kernels::RotationSignBits(seed, channels);
  sign_bits_ = at::empty({static_cast<int64_t>(bits.size())}, at::kInt);
  std::memcpy(sign_bits_.data_ptr(), bits.data(), bits.size() * sizeof(uint32_t));
}

at::Tensor ChannelRotation::SignBitsOn(const at::Device& device) const {
  if (device.is_cpu()) return sign_bits_;
  std::lock_guard<std::mutex> lock(device_bits_->mutex);
  at::Tensor& there = device_bits_->by_device[device.index()];
  if (!there.defined()) there = sign_bits_.to(device);
  return there;
}

at::Tensor ChannelRotation::Apply(const at::Tensor& x, int64_t axis, bool inverse) const {
  if (!enabled()) return x;
  const int64_t dim = axis < 0 ? axis + x.dim() : axis;
  TORCH_CHECK(dim >= 0 && dim < x.dim() && x.size(dim) == channels_, "rotation of ", channels_,
              " channels given a tensor of shape ", x.sizes(), " along dimension ", axis);
  // CUDA tensors take the kernel only where splitq's CUDA kernels and a CUDA libtorch were both
  // built (else the matmul, as before the kernel existed).
#if defined(SPLITQ_TORCH_CUDA)
  constexpr bool kCudaKernels = true;
#else
  constexpr bool kCudaKernels = false;
#endif
  if (!force_matmul_ && (x.device().is_cpu() || (kCudaKernels && x.device().is_cuda())) &&
      (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
       x.scalar_type() == at::kHalf)) {
    const kernels::GroupLayout layout =
        LayoutOf(x, Grouping{kernels::Granularity::kChannel, static_cast<int32_t>(dim)});
    if (kernels::RotateChannelsSupported(ContextOf(x), ToKernelDType(x.scalar_type()), layout,
                                         block_)) {
      return RotateFunction::apply(x, dim, block_, static_cast<int64_t>(seed_), inverse,
                                   SignBitsOn(x.device()));
    }
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
