// Tests for trainer/quant_layers.h: gradients flow through QuantLinear and QuantConv2d, and
// LoRA training changes only the adapters and the quantizer steps.
#include "trainer/quant_layers.h"

#include <gtest/gtest.h>
#include <torch/optim/adamw.h>

namespace splitq::trainer {
namespace {

TEST(QuantLinear, GradientsReachWeightsStepsAndInput) {
  QuantLinear layer(16, 8, true, QuantLayerOptions{4, 8, true});
  const at::Tensor x = at::randn({32, 16}).requires_grad_(true);
  layer->forward(x).square().sum().backward();
  EXPECT_GT(layer->linear->weight.grad().abs().sum().item<float>(), 0.0f);
  EXPECT_GT(layer->linear->bias.grad().abs().sum().item<float>(), 0.0f);
  EXPECT_GT(layer->weight_quantizer->scale().grad().abs().sum().item<float>(), 0.0f);
  EXPECT_GT(layer->input_quantizer->scale().grad().abs().sum().item<float>(), 0.0f);
  EXPECT_GT(x.grad().abs().sum().item<float>(), 0.0f);
}

TEST(QuantLinear, QuantizedWeightsTakeFewValuesPerChannel) {
  QuantLinear layer(64, 4, false, QuantLayerOptions{3, 0, true});
  at::NoGradGuard no_grad;
  const at::Tensor w = layer->weight_quantizer->forward(layer->linear->weight);
  for (int64_t c = 0; c < 4; ++c) EXPECT_LE(std::get<0>(at::_unique(w[c])).numel(), 8);
}

TEST(QuantConv2d, GradientsReachWeightsStepsAndInput) {
  QuantConv2dOptions o;
  o.in_channels = 3;
  o.out_channels = 5;
  o.padding = 1;
  o.quant = QuantLayerOptions{4, 8, false};
  QuantConv2d layer(o);
  const at::Tensor x = at::rand({2, 3, 8, 8}).requires_grad_(true);
  const at::Tensor y = layer->forward(x);
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{2, 5, 8, 8}));
  y.square().sum().backward();
  EXPECT_GT(layer->conv->weight.grad().abs().sum().item<float>(), 0.0f);
  EXPECT_GT(layer->weight_quantizer->scale().grad().abs().sum().item<float>(), 0.0f);
  EXPECT_GT(layer->input_quantizer->scale().grad().abs().sum().item<float>(), 0.0f);
  EXPECT_GT(x.grad().abs().sum().item<float>(), 0.0f);
}

TEST(Lora, StartsAtTheBaseAndTrainsOnlyAdaptersAndSteps) {
  QuantLinear layer(12, 6, true, QuantLayerOptions{4, 0, true});
  const at::Tensor x = at::randn({20, 12});
  const at::Tensor before = layer->forward(x).detach();
  layer->EnableLora(LoraOptions{4, 8.0});
  EXPECT_THROW(layer->EnableLora(LoraOptions{4, 8.0}), c10::Error);
  EXPECT_TRUE(at::allclose(layer->forward(x), before));
  std::vector<at::Tensor> trainable;
  for (const auto& p : layer->parameters()) {
    if (p.requires_grad()) trainable.push_back(p);
  }
  EXPECT_EQ(trainable.size(), 3u);  // lora_a, lora_b, the weight quantizer's step
  const at::Tensor weight0 = layer->linear->weight.clone();
  const at::Tensor bias0 = layer->linear->bias.clone();
  const at::Tensor a0 = layer->lora_a.clone(), b0 = layer->lora_b.clone();
  const at::Tensor step0 = layer->weight_quantizer->scale().clone();
  torch::optim::AdamW opt(trainable, torch::optim::AdamWOptions(1e-2));
  for (int step = 0; step < 3; ++step) {
    opt.zero_grad();
    (layer->forward(x) - 1.0).square().mean().backward();
    opt.step();
  }
  EXPECT_TRUE(at::equal(layer->linear->weight, weight0));
  EXPECT_TRUE(at::equal(layer->linear->bias, bias0));
  EXPECT_FALSE(at::equal(layer->lora_a, a0));
  EXPECT_FALSE(at::equal(layer->lora_b, b0));
  EXPECT_FALSE(at::equal(layer->weight_quantizer->scale(), step0));
}

}  // namespace
}  // namespace splitq::trainer
