#include "trainer/quant_layers.h"

#include <torch/nn/functional/conv.h>
#include <torch/nn/functional/linear.h>

#include <cmath>

namespace splitq::trainer {
namespace {

quant::LsqQuantizer MakeWeightQuantizer(int bits, int64_t out_channels) {
  if (bits == 0) return nullptr;
  quant::LsqOptions o;
  o.bits = bits;
  o.is_signed = true;
  o.grouping = quant::Grouping{kernels::Granularity::kChannel, 0};
  return quant::LsqQuantizer(o, out_channels);
}

quant::LsqQuantizer MakeInputQuantizer(int bits, bool is_signed) {
  if (bits == 0) return nullptr;
  quant::LsqOptions o;
  o.bits = bits;
  o.is_signed = is_signed;
  o.grouping = quant::Grouping{kernels::Granularity::kTensor, 0};
  return quant::LsqQuantizer(o, 1);
}

}  // namespace

QuantLinearImpl::QuantLinearImpl(int64_t in_features, int64_t out_features, bool bias,
                                 const QuantLayerOptions& options) {
  linear = register_module(
      "linear", torch::nn::Linear(torch::nn::LinearOptions(in_features, out_features).bias(bias)));
  weight_quantizer = MakeWeightQuantizer(options.weight_bits, out_features);
  if (weight_quantizer) register_module("weight_quantizer", weight_quantizer);
  input_quantizer = MakeInputQuantizer(options.input_bits, options.input_signed);
  if (input_quantizer) register_module("input_quantizer", input_quantizer);
}

at::Tensor QuantLinearImpl::forward(const at::Tensor& x) {
  const at::Tensor input = input_quantizer ? input_quantizer->forward(x) : x;
  const at::Tensor weight =
      weight_quantizer ? weight_quantizer->forward(linear->weight) : linear->weight;
  at::Tensor y = torch::nn::functional::linear(input, weight, linear->bias);
  if (has_lora()) y = y + at::matmul(at::matmul(x, lora_a.t()), lora_b.t()) * lora_scaling;
  return y;
}

QuantConv2dImpl::QuantConv2dImpl(const QuantConv2dOptions& options)
    : stride_(options.stride), padding_(options.padding) {
  conv = register_module(
      "conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(options.in_channels, options.out_channels,
                                                         options.kernel_size)
                                    .stride(options.stride)
                                    .padding(options.padding)
                                    .bias(options.bias)));
  weight_quantizer = MakeWeightQuantizer(options.quant.weight_bits, options.out_channels);
  if (weight_quantizer) register_module("weight_quantizer", weight_quantizer);
  input_quantizer = MakeInputQuantizer(options.quant.input_bits, options.quant.input_signed);
  if (input_quantizer) register_module("input_quantizer", input_quantizer);
}

at::Tensor QuantConv2dImpl::forward(const at::Tensor& x) {
  const at::Tensor input = input_quantizer ? input_quantizer->forward(x) : x;
  const at::Tensor weight =
      weight_quantizer ? weight_quantizer->forward(conv->weight) : conv->weight;
  return at::conv2d(input, weight, conv->bias, {stride_, stride_}, {padding_, padding_});
}

void QuantLinearImpl::EnableLora(const LoraOptions& options) {
  TORCH_CHECK(options.rank >= 1, "LoRA rank must be >= 1, got ", options.rank);
  TORCH_CHECK(!has_lora(), "LoRA is already enabled on this layer");
  linear->weight.set_requires_grad(false);
  if (linear->bias.defined()) linear->bias.set_requires_grad(false);
  const int64_t in = linear->weight.size(1), out = linear->weight.size(0);
  // A as nn.Linear's default init would draw it; B zero, so the update starts at zero.
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  const auto opts = linear->weight.options();
  lora_a =
      register_parameter("lora_a", at::empty({options.rank, in}, opts).uniform_(-bound, bound));
  lora_b = register_parameter("lora_b", at::zeros({out, options.rank}, opts));
  lora_scaling = options.alpha / static_cast<double>(options.rank);
}

}  // namespace splitq::trainer
