// splitq trainer: layers for quantization-aware training of the model itself, and LoRA.
//
//   QuantLinear / QuantConv2d  a Linear / Conv2d whose weight goes through an LSQ quantizer
//                              (signed, one learned step per output channel) and whose input
//                              goes through another (one learned step for the tensor), e.g.
//                              W4A8. A bit width of 0 leaves that side in floating point.
//   QuantLinear::EnableLora    freezes the layer's weight and bias and adds a trainable
//                              low-rank update: y = layer(x) + (alpha / rank) x A^T B^T, with
//                              A [rank, in] random and B [out, rank] zero (training starts from
//                              the base model). The quantizer steps stay trainable (design.md:
//                              LoRA, scales and gates train).
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include "quant/lsq_quantizer.h"

namespace splitq::trainer {

struct QuantLayerOptions {
  int weight_bits = 0;       // 0: float weights; else 2..8 (signed LSQ, per output channel)
  int input_bits = 0;        // 0: float inputs; else 1..8 (LSQ, one step for the tensor)
  bool input_signed = true;  // false for inputs known to be >= 0 (after a ReLU)
};

struct LoraOptions {
  int64_t rank = 8;     // >= 1
  double alpha = 16.0;  // the update is scaled by alpha / rank
};

class QuantLinearImpl : public torch::nn::Module {
 public:
  QuantLinearImpl(int64_t in_features, int64_t out_features, bool bias,
                  const QuantLayerOptions& options);
  at::Tensor forward(const at::Tensor& x);

  // Freezes weight and bias and adds the LoRA adapters (once; a second call is an error).
  void EnableLora(const LoraOptions& options);
  bool has_lora() const { return lora_a.defined(); }

  torch::nn::Linear linear{nullptr};              // holds weight [out, in] and bias
  quant::LsqQuantizer weight_quantizer{nullptr};  // null when weight_bits == 0
  quant::LsqQuantizer input_quantizer{nullptr};   // null when input_bits == 0
  at::Tensor lora_a;                              // [rank, in], trainable; undefined without LoRA
  at::Tensor lora_b;                              // [out, rank], trainable, starts at zero
  double lora_scaling = 0.0;
};
TORCH_MODULE(QuantLinear);

struct QuantConv2dOptions {
  int64_t in_channels = 1, out_channels = 1, kernel_size = 3, stride = 1, padding = 0;
  bool bias = true;
  QuantLayerOptions quant;
};

class QuantConv2dImpl : public torch::nn::Module {
 public:
  explicit QuantConv2dImpl(const QuantConv2dOptions& options);
  at::Tensor forward(const at::Tensor& x);

  torch::nn::Conv2d conv{nullptr};
  quant::LsqQuantizer weight_quantizer{nullptr};
  quant::LsqQuantizer input_quantizer{nullptr};

 private:
  int64_t stride_, padding_;
};
TORCH_MODULE(QuantConv2d);

}  // namespace splitq::trainer
