// Smoke runs of trainer/train_loop.h, one per task and wire mode: the loss falls clearly
// below its start, no frame exceeds the budget, the files a user reads are written, and the
// wire carries far fewer bytes than fp32 would.
#include "trainer/train_loop.h"

#include <gtest/gtest.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <fstream>

#include "trainer/datasets.h"

namespace splitq::trainer {
namespace {

RunConfig ConfigFrom(const std::string& yaml) {
  auto c = ParseRunConfig(YAML::Load(yaml));
  EXPECT_TRUE(c.ok()) << c.status();
  return *c;
}

std::string OutDir(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("splitq_train_" + name)).string();
}

TrainSummary RunOrFail(const RunConfig& c, const std::string& name) {
  auto summary = Train(c, TrainOptions{OutDir(name), {}});
  EXPECT_TRUE(summary.ok()) << summary.status();
  return summary.ok() ? *summary : TrainSummary{};
}

class FashionMnistSmoke : public ::testing::Test {
 protected:
  void SetUp() override {
    if (access(kFashionMnistDir, R_OK) != 0) {
      GTEST_SKIP() << kFashionMnistDir << " missing: install dataset-fashion-mnist";
    }
  }
};

TEST_F(FashionMnistSmoke, AmaqLearnsUnderAShrinkingBudget) {
  const RunConfig c = ConfigFrom(R"(
task: fmnist
steps: 60
batch_size: 32
log_every: 10
optim: {warmup_steps: 5}
quant:
  activations: {mode: amaq, target: [{step: 0, bits: 8}, {step: 40, bits: 3}]}
  gradients: {mode: uniform, target: 6}
)");
  const TrainSummary s = RunOrFail(c, "amaq");
  EXPECT_LT(s.last_loss, 0.7 * s.first_loss);
  EXPECT_LE(s.max_budget_excess, 0.0);
  EXPECT_LE(s.avg_act_bits, 3.0);
  EXPECT_GT(s.val_accuracy, 0.5);
  EXPECT_LT(s.bytes_up * 5, s.bytes_fp32_equivalent / 2);
  EXPECT_TRUE(std::filesystem::exists(std::filesystem::path(OutDir("amaq")) / "summary.json"));
  std::ifstream metrics(std::filesystem::path(OutDir("amaq")) / "metrics.jsonl");
  int lines = 0;
  for (std::string line; std::getline(metrics, line);) {
    EXPECT_NE(line.find("\"act_bits\""), std::string::npos);
    ++lines;
  }
  EXPECT_EQ(lines, 6);
}

TEST_F(FashionMnistSmoke, UniformAndFloat32Learn) {
  for (const char* mode : {"uniform", "fp32"}) {
    const RunConfig c = ConfigFrom(std::string(R"(
task: fmnist
steps: 40
batch_size: 32
log_every: 10
optim: {warmup_steps: 5}
quant: {activations: {mode: )") + mode +
                                   R"(, bits: {min: 4, max: 4}, target: 4}, gradients: {mode: )" +
                                   mode + R"(}}
)");
    const TrainSummary s = RunOrFail(c, mode);
    EXPECT_LT(s.last_loss, 0.7 * s.first_loss) << mode;
    EXPECT_LE(s.max_budget_excess, 0.0) << mode;
  }
}

TEST(TrainLoop, LanguageModelOnAUserCorpusLearns) {
  const std::string corpus = OutDir("corpus.txt");
  {
    std::ofstream f(corpus);
    for (int i = 0; i < 400; ++i) f << "the quick brown fox jumps over the lazy dog. ";
  }
  const RunConfig c = ConfigFrom(R"(
task: lm
steps: 40
batch_size: 8
log_every: 10
model: {layers: 2, width: 32, heads: 2, context: 32, split_after: 1}
data: {corpus: )" + corpus + R"(, validation_fraction: 0.1}
optim: {lr: 0.003, warmup_steps: 5}
quant:
  activations: {mode: amaq, target: [{step: 0, bits: 8}, {step: 30, bits: 4}]}
)");
  const TrainSummary s = RunOrFail(c, "lm");
  EXPECT_LT(s.last_loss, 0.7 * s.first_loss);
  EXPECT_GT(s.val_bits_per_byte, 0.0);
  EXPECT_LT(s.val_accuracy, 0.0);  // null for a language model
  EXPECT_LE(s.max_budget_excess, 0.0);
}

TEST(TrainLoop, RefusesWhatItDoesNotDoYet) {
  RunConfig c = ConfigFrom("task: fmnist\nmodel: {split_after: 1, u_shaped: true}");
  EXPECT_EQ(Train(c, TrainOptions{OutDir("refused"), {}}).status().code(),
            absl::StatusCode::kUnimplemented);
  c = ConfigFrom("task: fmnist\nquant: {activations: {mode: aqsgd}}");
  EXPECT_EQ(Train(c, TrainOptions{OutDir("refused"), {}}).status().code(),
            absl::StatusCode::kUnimplemented);
}

}  // namespace
}  // namespace splitq::trainer
