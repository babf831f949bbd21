#include "quant/channel_rotation.h"

#include <cmath>
#include <vector>

#include "kernels/rotate.h"

namespace splitq::quant {

ChannelRotation::ChannelRotation(int64_t channels, int64_t block, uint64_t seed)
    : channels_(channels) {
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
