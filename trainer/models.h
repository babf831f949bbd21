// splitq trainer: the models, cut for split learning.
//
// A SplitModel has three parts. The client runs `client` on its data; the boundary tensor
// crosses the network (through the AMAQ boundary and the wire codec); the server runs
// `server`. In the U-shaped variant the server's output crosses back and the client runs
// `head` and owns the labels and the loss; otherwise `head` is empty and the server's output
// is the logits.
//
//   FashionMnistCnn (blocks, input [N, 1, 28, 28]):
//     0 conv 1->32 3x3 + ReLU + maxpool 2      -> [N, 32, 14, 14]
//     1 conv 32->64 3x3 + ReLU + maxpool 2     -> [N, 64, 7, 7]
//     2 flatten + linear 3136->128 + ReLU      -> [N, 128]
//     3 linear 128->10                         -> logits [N, 10]
//   split_after = k puts blocks [0, k) on the client (1 <= k <= 3; U-shaped: k <= 2, and
//   block 3 is the client's head). The boundary's channels are axis 1.
//
//   ByteTransformer (input int64 bytes [B, T], T <= context):
//     embedding (256 -> width) + learned positions, then `layers` pre-LayerNorm blocks
//     (causal multi-head attention: qkv and proj linears; MLP: fc1, GELU, fc2), then a final
//     LayerNorm and the head linear width -> 256 (logits over the next byte).
//   split_after = k puts the embedding and blocks [0, k) on the client (1 <= k < layers);
//   U-shaped: the final LayerNorm and head are the client's head. The boundary is
//   [B, T, width], channels on axis 2.
// Every linear and conv is a QuantLinear / QuantConv2d (QAT when `quant` sets bit widths).
#pragma once

#include <torch/nn/modules/container/sequential.h>

#include <string>
#include <vector>

#include "trainer/quant_layers.h"

namespace splitq::trainer {

struct SplitModel {
  torch::nn::Sequential client;
  torch::nn::Sequential server;
  torch::nn::Sequential head;  // empty unless U-shaped
  int boundary_channel_axis = 1;

  // All parameters of the three parts.
  std::vector<at::Tensor> parameters() const;
  // Logits of the whole model, in one process (tests, evaluation).
  at::Tensor forward(const at::Tensor& x);
};

struct CnnOptions {
  int split_after = 2;
  bool u_shaped = false;
  QuantLayerOptions quant;
};
// Errors (c10::Error): split_after outside the range above.
SplitModel FashionMnistCnn(const CnnOptions& options);

struct TransformerOptions {
  int layers = 4;       // >= 2
  int64_t width = 256;  // divisible by heads
  int64_t heads = 4;
  int64_t context = 128;  // longest sequence, bytes
  int split_after = 2;
  bool u_shaped = false;
  QuantLayerOptions quant;
};
// Errors (c10::Error): bad sizes, split_after outside [1, layers).
SplitModel ByteTransformer(const TransformerOptions& options);

// LoRA fine-tuning: enables LoRA on the transformer linears whose names are in `targets`
// ("qkv", "proj", "fc1", "fc2"), then freezes every parameter except the adapters and the
// quantizer parameters (LSQ steps and offsets). Returns how many linears got adapters.
int ApplyLora(SplitModel& model, const std::vector<std::string>& targets,
              const LoraOptions& options);

}  // namespace splitq::trainer
