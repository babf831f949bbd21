// Tests for trainer/models.h: boundary shapes at every split point, U-shaped parts,
// causality of the byte transformer, LoRA freezing, and split points outside the model.
#include "trainer/models.h"

#include <gtest/gtest.h>

namespace splitq::trainer {
namespace {

class CnnSplits : public ::testing::TestWithParam<std::tuple<int, bool>> {};

TEST_P(CnnSplits, BoundaryAndLogitShapes) {
  const auto [split, u_shaped] = GetParam();
  CnnOptions o;
  o.split_after = split;
  o.u_shaped = u_shaped;
  o.quant = QuantLayerOptions{4, 8, true};
  SplitModel m = FashionMnistCnn(o);
  const at::Tensor x = at::rand({3, 1, 28, 28});
  const at::Tensor boundary = m.client->forward(x);
  const std::vector<std::vector<int64_t>> expected = {{3, 32, 14, 14}, {3, 64, 7, 7}, {3, 128}};
  EXPECT_EQ(boundary.sizes(), expected[split - 1]);
  EXPECT_EQ(m.forward(x).sizes(), (std::vector<int64_t>{3, 10}));
  EXPECT_EQ(m.head->size() > 0, u_shaped);
}

INSTANTIATE_TEST_SUITE_P(Splits, CnnSplits,
                         ::testing::Values(std::make_tuple(1, false), std::make_tuple(2, false),
                                           std::make_tuple(3, false), std::make_tuple(1, true),
                                           std::make_tuple(2, true)));

TEST(Models, SplitPointsOutsideTheModelAreRefused) {
  CnnOptions cnn;
  cnn.split_after = 4;
  EXPECT_THROW(FashionMnistCnn(cnn), c10::Error);
  cnn.split_after = 3;
  cnn.u_shaped = true;  // the server would be empty
  EXPECT_THROW(FashionMnistCnn(cnn), c10::Error);
  TransformerOptions lm;
  lm.layers = 4;
  lm.split_after = 4;
  EXPECT_THROW(ByteTransformer(lm), c10::Error);
  lm.split_after = 0;
  EXPECT_THROW(ByteTransformer(lm), c10::Error);
}

TransformerOptions SmallLm() {
  TransformerOptions o;
  o.layers = 3;
  o.width = 32;
  o.heads = 4;
  o.context = 16;
  o.split_after = 1;
  return o;
}

TEST(ByteTransformer, ShapesAndCausality) {
  SplitModel m = ByteTransformer(SmallLm());
  at::Tensor bytes = at::randint(0, 256, {2, 16}, at::kLong);
  const at::Tensor boundary = m.client->forward(bytes);
  EXPECT_EQ(boundary.sizes(), (std::vector<int64_t>{2, 16, 32}));
  const at::Tensor logits = m.forward(bytes);
  EXPECT_EQ(logits.sizes(), (std::vector<int64_t>{2, 16, 256}));
  at::Tensor changed = bytes.clone();
  changed[0][10] = (changed[0][10].item<int64_t>() + 1) % 256;
  const at::Tensor logits2 = m.forward(changed);
  // Positions before the change do not see it; the changed position does.
  EXPECT_TRUE(at::allclose(logits.slice(1, 0, 10), logits2.slice(1, 0, 10)));
  EXPECT_FALSE(at::allclose(logits[0][10], logits2[0][10]));
  EXPECT_THROW(m.forward(at::zeros({1, 17}, at::kLong)), c10::Error);
}

TEST(ByteTransformer, LoraLeavesOnlyAdaptersAndQuantizerStepsTrainable) {
  TransformerOptions o = SmallLm();
  o.quant = QuantLayerOptions{4, 0, true};
  SplitModel m = ByteTransformer(o);
  EXPECT_EQ(ApplyLora(m, {"qkv", "proj", "fc1", "fc2"}, LoraOptions{4, 8.0}), 3 * 4);
  int64_t trainable = 0, lora = 0;
  for (torch::nn::Sequential* part : {&m.client, &m.server, &m.head}) {
    for (const auto& item : (*part)->named_parameters()) {
      const std::string& name = item.key();
      const bool is_lora = name.find("lora_") != std::string::npos;
      const bool is_step = name.size() >= 6 && name.compare(name.size() - 6, 6, ".scale") == 0;
      EXPECT_EQ(item.value().requires_grad(), is_lora || is_step) << name;
      trainable += item.value().requires_grad();
      lora += is_lora;
    }
  }
  EXPECT_EQ(lora, 2 * 3 * 4);
  EXPECT_GT(trainable, lora);  // the weight quantizers' steps
}

}  // namespace
}  // namespace splitq::trainer
