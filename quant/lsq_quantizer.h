// splitq quant: LsqQuantizer, a fake-quantizer with a learned step size (LSQ) and,
// optionally, a learned offset (LSQ+), for quantization-aware training of weights and
// activations.
//
// Forward: x_hat = clamp(rint((x - beta) / s), qmin, qmax) * s + beta, per tensor or per
// channel (kernels/common.h). Backward (one fused kernel pass, kernels/lsq_backward.h):
//   dx    = dy where the code is in range, else 0
//   ds    = g * sum dy * (rint(u) - u | qmin | qmax)
//   dbeta = g * sum dy * (0 | 1 | 1)
// with the LSQ gradient scale g = 1 / sqrt(n * qmax), n = elements per group.
// The step is initialised on the first forward call: s = 2 * mean|x| / sqrt(qmax) per
// group (beta = 0). The `initialized` buffer records this so that checkpoints restore it.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "quant/tensor_ops.h"

namespace splitq::quant {

struct LsqOptions {
  int bits = 8;               // 1..8 unsigned, 2..8 signed
  bool is_signed = true;      // signed codes (weights) or unsigned (e.g. after ReLU)
  bool learn_offset = false;  // LSQ+: learn beta as well
  Grouping grouping{kernels::Granularity::kChannel, 0};  // kTensor or kChannel
};

// LSQ fake-quant as an autograd op, for callers that hold their own parameters.
// `scale` and `offset` are [groups] float32 tensors (offset may be undefined).
at::Tensor LsqFakeQuant(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& offset,
                        const LsqOptions& options);

// The LSQ gradient scale 1 / sqrt(n * qmax).
double LsqGradScale(int64_t elements_per_group, int qmax);

class LsqQuantizerImpl : public torch::nn::Module {
 public:
  // `groups`: 1 for per-tensor, else the size of the channel axis.
  LsqQuantizerImpl(const LsqOptions& options, int64_t groups);

  at::Tensor forward(const at::Tensor& x);

  const LsqOptions& options() const { return options_; }
  at::Tensor scale() const { return scale_; }
  at::Tensor offset() const { return offset_; }
  bool initialized() const;

 private:
  void Initialize(const at::Tensor& x);

  LsqOptions options_;
  at::Tensor scale_;        // parameter [groups]
  at::Tensor offset_;       // parameter [groups] (LSQ+), else undefined
  at::Tensor initialized_;  // buffer, scalar uint8
  bool known_initialized_ = false;
};
TORCH_MODULE(LsqQuantizer);

}  // namespace splitq::quant
