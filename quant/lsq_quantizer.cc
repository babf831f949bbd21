#include "quant/lsq_quantizer.h"

#include <torch/csrc/autograd/custom_function.h>

#include <cmath>

namespace splitq::quant {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr double kMinScale = 1e-8;

Grouping GroupingFromSaved(AutogradContext* ctx) {
  return Grouping{static_cast<kernels::Granularity>(ctx->saved_data["granularity"].toInt()),
                  static_cast<int>(ctx->saved_data["axis"].toInt())};
}

// Autograd op for LSQ / LSQ+: forward is the fake-quant kernel, backward the fused kernel.
struct LsqFunction : public torch::autograd::Function<LsqFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& offset, int64_t bits, bool is_signed,
                            int64_t granularity, int64_t axis) {
    const Grouping grouping{static_cast<kernels::Granularity>(granularity), static_cast<int>(axis)};
    QuantTensors q;
    q.scale = scale.contiguous();
    // An empty offset means "no offset" (autograd functions cannot take undefined inputs).
    const bool has_offset = offset.numel() > 0;
    q.offset = has_offset ? offset.contiguous() : at::Tensor();
    q.uniform_bits = static_cast<int>(bits);
    q.is_signed = is_signed;
    ctx->save_for_backward({x, q.scale, offset});
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["is_signed"] = is_signed;
    ctx->saved_data["granularity"] = granularity;
    ctx->saved_data["axis"] = axis;
    ctx->saved_data["has_offset"] = has_offset;
    return FakeQuantize(x, grouping, q);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    QuantTensors q;
    q.scale = saved[1];
    if (ctx->saved_data["has_offset"].toBool()) q.offset = saved[2];
    q.uniform_bits = static_cast<int>(ctx->saved_data["bits"].toInt());
    q.is_signed = ctx->saved_data["is_signed"].toBool();
    const Grouping grouping = GroupingFromSaved(ctx);
    const LsqGradSums sums = LsqBackward(x, grads[0], grouping, q);
    const int64_t per_group = LayoutOf(x, grouping).per_group();
    const double g = LsqGradScale(per_group, kernels::QMax(q.uniform_bits, q.is_signed));
    at::Tensor grad_offset;
    if (q.offset.defined()) grad_offset = sums.grad_offset_sum * g;
    return {
        sums.grad_x, sums.grad_scale_sum * g, grad_offset, at::Tensor(), at::Tensor(), at::Tensor(),
        at::Tensor()};
  }
};

}  // namespace

double LsqGradScale(int64_t elements_per_group, int qmax) {
  const double denom = static_cast<double>(elements_per_group) * static_cast<double>(qmax);
  return denom > 0 ? 1.0 / std::sqrt(denom) : 0.0;
}

at::Tensor LsqFakeQuant(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& offset,
                        const LsqOptions& options) {
  TORCH_CHECK(options.bits >= 1 && options.bits <= 8, "LSQ bits must be in 1..8, got ",
              options.bits);
  TORCH_CHECK(!options.is_signed || options.bits >= 2,
              "signed LSQ needs at least 2 bits (1 signed bit has codes {-1, 0} and qmax 0)");
  // The clamp keeps the step positive whatever the optimiser does; its gradient is the
  // identity wherever the step is valid.
  return LsqFunction::apply(
      x, scale.clamp_min(kMinScale), offset.defined() ? offset : at::empty({0}, scale.options()),
      options.bits, options.is_signed, static_cast<int64_t>(options.grouping.granularity),
      options.grouping.axis);
}

LsqQuantizerImpl::LsqQuantizerImpl(const LsqOptions& options, int64_t groups) : options_(options) {
  TORCH_CHECK(options.grouping.granularity != kernels::Granularity::kToken,
              "LsqQuantizer learns one step per tensor or per channel, not per token");
  TORCH_CHECK(options.bits >= 1 && options.bits <= 8, "LSQ bits must be in 1..8, got ",
              options.bits);
  TORCH_CHECK(!options.is_signed || options.bits >= 2,
              "signed LSQ needs at least 2 bits (1 signed bit has codes {-1, 0} and qmax 0)");
  TORCH_CHECK(groups >= 1, "groups must be >= 1");
  scale_ = register_parameter("scale", at::ones({groups}));
  if (options.learn_offset) offset_ = register_parameter("offset", at::zeros({groups}));
  initialized_ = register_buffer("initialized", at::zeros({}, at::kByte));
}

bool LsqQuantizerImpl::initialized() const { return initialized_.item<uint8_t>() != 0; }

void LsqQuantizerImpl::Initialize(const at::Tensor& x) {
  at::NoGradGuard no_grad;
  const kernels::GroupLayout layout = LayoutOf(x, options_.grouping);
  TORCH_CHECK(layout.groups == scale_.numel(), "LsqQuantizer has ", scale_.numel(),
              " groups, input has ", layout.groups);
  const at::Tensor mean_abs = x.detach()
                                  .to(at::kFloat)
                                  .abs()
                                  .reshape({layout.outer, layout.groups, layout.inner})
                                  .mean(at::IntArrayRef{0, 2});
  const double qmax = kernels::QMax(options_.bits, options_.is_signed);
  scale_.copy_((mean_abs * (2.0 / std::sqrt(qmax))).clamp_min(kMinScale));
  initialized_.fill_(1);
}

at::Tensor LsqQuantizerImpl::forward(const at::Tensor& x) {
  // The flag is cached so that a CUDA step does not synchronise on it; the buffer stays the
  // truth for checkpoints.
  if (!known_initialized_) {
    if (!initialized()) Initialize(x);
    known_initialized_ = true;
  }
  return LsqFakeQuant(x, scale_, offset_, options_);
}

}  // namespace splitq::quant
