// Test helpers for server parts fed raw fp32 frames (no client part, no data set): a small
// Fashion-MNIST config with fp32 boundaries, a server part of it seeded alike every time, and
// an UpFrame of a tensor.
#pragma once

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <yaml-cpp/yaml.h>

#include <memory>

#include "trainer/boundary.h"
#include "trainer/server_part.h"

namespace splitq::trainer::testing {

inline RunConfig Fp32Config() {
  auto c = ParseRunConfig(YAML::Load(R"(
task: fmnist
batch_size: 8
optim: {warmup_steps: 0, grad_clip: 1.0}
quant:
  activations: {mode: fp32}
  gradients: {mode: fp32}
)"));
  EXPECT_TRUE(c.ok()) << c.status();
  c->device = "cpu";
  return *c;
}

// Seeded with 0 before it is built: two of them start equal.
inline std::unique_ptr<ServerPart> NewFp32Server(const RunConfig& config = Fp32Config()) {
  ServerPartOptions o;
  o.max_batch = 64;
  torch::manual_seed(0);
  auto s = ServerPart::Create(config, "", o);
  EXPECT_TRUE(s.ok()) << s.status();
  return std::move(*s);
}

inline UpFrame FrameOf(const at::Tensor& h, const at::Tensor& labels, int64_t step) {
  UpFrame up;
  up.step = step;
  up.frame = std::make_shared<const std::string>(internal::EncodeRawTensor(h));
  const at::Tensor l = labels.to(at::kInt).contiguous();
  up.labels.assign(l.data_ptr<int32_t>(), l.data_ptr<int32_t>() + l.numel());
  return up;
}

}  // namespace splitq::trainer::testing
