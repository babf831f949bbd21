// Tests for trainer/config.h: defaults, the design's example, every kind of config error
// (each names the key path and the value), --set overrides, and the configs/ directory.
#include "trainer/config.h"

#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace splitq::trainer {
namespace {

absl::StatusOr<RunConfig> Parse(const std::string& yaml) {
  return ParseRunConfig(YAML::Load(yaml));
}

void ExpectError(const std::string& yaml, const std::string& needle) {
  auto c = Parse(yaml);
  ASSERT_FALSE(c.ok()) << yaml;
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find(needle), std::string::npos)
      << "message: " << c.status().message() << "\nexpected to contain: " << needle;
}

TEST(RunConfig, EmptyDocumentGivesTheDefaults) {
  auto c = Parse("");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->task, Task::kFashionMnist);
  EXPECT_EQ(c->steps, 600);
  EXPECT_EQ(c->activations.mode, WireMode::kAmaq);
  EXPECT_DOUBLE_EQ(c->activations.target.TargetAt(1000), 8);
  EXPECT_EQ(c->client_micro_batches, 1);
  auto sliced = Parse("client: {micro_batches: 4}");
  ASSERT_TRUE(sliced.ok()) << sliced.status();
  EXPECT_EQ(sliced->client_micro_batches, 4);
}

TEST(RunConfig, DesignExampleParses) {
  auto c = Parse(R"(
quant:
  activations:
    bits: {min: 2, max: 8}
    target: [{step: 0, bits: 8}, {step: 2000, bits: 4, curve: cosine}, {step: 6000, bits: 3}]
    gate: {alpha: 2.0, lr: 0.01, beta: 1.0e-3, lambda: 1.0}
    scale: learned
    granularity: channel
  gradients:
    bits: {min: 4, max: 8}
    target: [{step: 0, bits: 8}, {step: 4000, bits: 4, curve: linear}]
    rounding: stochastic
  weights: {bits: 4, granularity: channel, scale: lsq}
)");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_DOUBLE_EQ(c->activations.target.TargetAt(1000), 6);
  EXPECT_DOUBLE_EQ(c->gradients.target.TargetAt(2000), 6);
  EXPECT_EQ(c->weight_bits, 4);
  EXPECT_EQ(c->gradients.rounding, kernels::Rounding::kStochastic);
}

TEST(RunConfig, ErrorsNameTheKeyAndTheValue) {
  ExpectError("stepz: 10", "stepz: unknown key (value '10'");
  ExpectError("quant: {activations: {gatee: {alpha: 2}}}", "quant.activations.gatee: unknown key");
  ExpectError("steps: abc", "steps: expected an integer, got 'abc'");
  ExpectError("steps: 0", "steps: 0 is outside >= 1");
  ExpectError("client: {micro_batches: 0}", "client.micro_batches: 0 is outside 1..1024");
  ExpectError("task: vision", "task: 'vision' is not one of fmnist, lm");
  ExpectError("quant: {activations: {bits: {min: 2, max: 9}}}",
              "quant.activations.bits.max: 9 is outside");
  ExpectError("quant: {activations: {target: 1}}",
              "quant.activations.target[0].bits: 1 is outside the allowed range [2, 8]");
  ExpectError("quant: {gradients: {target: [{step: 0, bits: 8}, {step: 0, bits: 4}]}}",
              "quant.gradients.target[1].step: 0 does not come after");
  ExpectError("model: {split_after: 4}",
              "model.split_after: 4 is outside the model (1..3 for the CNN)");
  ExpectError("model: {split_after: 3, u_shaped: true}",
              "model.split_after: 3 is outside the model (1..2 for the CNN, U-shaped)");
  ExpectError("task: lm\nmodel: {layers: 4, split_after: 4}",
              "model.split_after: 4 is outside the model (1..3 for this transformer)");
  ExpectError("model: {width: 30, heads: 4}", "model.heads: 4 does not divide model.width 30");
  ExpectError("quant: {weights: {bits: 1}}", "quant.weights.bits: 1 is outside 0 or 2..8");
  ExpectError("lora: {rank: 4}", "lora.rank: LoRA applies to task lm only");
  ExpectError("task: lm\nlora: {rank: 4, targets: [qkv, mlp]}",
              "lora.targets: 'mlp' is not one of");
  ExpectError("model: 3", "model: expected a map of keys");
  ExpectError("quant: {activations: {mode: uniform, coding: rans, budget: bytes}}",
              "quant.activations.budget: bytes prices learned bits, which only");
  ExpectError("quant: {activations: {budget: bytes}}",
              "quant.activations.budget: bytes counts coded bytes, but quant.activations.coding is "
              "none");
  ExpectError("quant: {activations: {budget: kib}}",
              "quant.activations.budget: 'kib' is not one of bits, bytes");
  // A budget in coded bits may go below bits.min (down to 0.1); one in bits may not.
  ExpectError("quant: {activations: {coding: rans, budget: bytes, target: 0.05}}",
              "quant.activations.target[0].bits: 0.05 is outside the allowed range [0.1, 8]");
  auto coded = ParseRunConfig(
      YAML::Load("quant: {activations: {coding: rans, budget: bytes, target: 0.6}}"));
  ASSERT_TRUE(coded.ok()) << coded.status();
  EXPECT_DOUBLE_EQ(coded->activations.target.TargetAt(0), 0.6);
  EXPECT_TRUE(coded->activations.budget_in_bytes);
  ExpectError("optim: {bf16_autocast: maybe}",
              "optim.bf16_autocast: expected true or false, got 'maybe'");
}

TEST(RunConfig, OverridesReplaceAndAddKeys) {
  YAML::Node root = YAML::Load("steps: 100\nquant: {activations: {mode: amaq}}");
  ASSERT_TRUE(ApplyOverride(root, "steps=7").ok());
  ASSERT_TRUE(ApplyOverride(root, "quant.activations.target=3").ok());
  ASSERT_TRUE(ApplyOverride(root, "model.split_after=1").ok());
  ASSERT_TRUE(
      ApplyOverride(root, "quant.gradients.target=[{step: 0, bits: 8}, {step: 10, bits: 4}]").ok());
  auto c = ParseRunConfig(root);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->steps, 7);
  EXPECT_EQ(c->split_after, 1);
  EXPECT_DOUBLE_EQ(c->activations.target.TargetAt(0), 3);
  EXPECT_DOUBLE_EQ(c->gradients.target.TargetAt(5), 6);
  EXPECT_FALSE(ApplyOverride(root, "steps").ok());
  EXPECT_FALSE(ApplyOverride(root, "=3").ok());
  EXPECT_FALSE(ApplyOverride(root, "steps.inner=3").ok());  // steps is not a map
  // An empty or null value would give the key its default again; an empty path part (a
  // leading, doubled or trailing dot) would be ignored (the sixth outside probe).
  for (const char* bad :
       {"steps=", "steps=~", "steps=null", ".steps=1", "optim..lr=1", "steps.=1"}) {
    const absl::Status st = ApplyOverride(root, bad);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << bad << ": " << st;
  }
}

// What YAML would quietly reinterpret is refused (the sixth outside probe): a repeated key
// (YAML keeps the first), a key that is not a plain name, and integers that are not plain
// decimal (yaml-cpp reads 010 as 8 and 0x10 as 16).
TEST(RunConfig, WhatYamlWouldReinterpretIsRefused) {
  ExpectError("steps: 60\nsteps: .nan\n", "steps: the key appears twice");
  ExpectError("optim: {lr: 0.001}\noptim: {lr: .nan}\n", "optim: the key appears twice");
  ExpectError("optim: {lr: 0.001, lr: 0.1}\n", "optim.lr: the key appears twice");
  ExpectError("? [a, b]\n: 1\n", "a key must be a plain name");
  ExpectError("steps: 010\n", "write integers in decimal");
  ExpectError("steps: 0x10\n", "write integers in decimal");
  ExpectError("steps: -07\n", "write integers in decimal");
  auto c = Parse("steps: 10\nbatch_size: 0\n");
  EXPECT_FALSE(c.ok());  // 0 itself is a decimal integer (refused here for its range only)
  EXPECT_EQ(c.status().message().find("decimal"), std::string::npos) << c.status();
  ASSERT_TRUE(Parse("steps: 10\nbatch_size: 100\n").ok());
}

TEST(RunConfig, UnknownKeysSuggestTheNearestKnownOne) {
  ExpectError("stepz: 10", "stepz: unknown key (value '10'; did you mean 'steps'?");
  ExpectError("lr: 0.1", "lr: unknown key (value '0.1'; did you mean 'optim.lr'?");
  ExpectError("optim: {warmup: 10}", "did you mean 'optim.warmup_steps'?");
  ExpectError("quant: {activation: {mode: amaq}}", "did you mean 'quant.activations'?");
  ExpectError("quant: {activations: {gatee: {alpha: 2}}}",
              "did you mean 'quant.activations.gate'?");
  auto far = Parse("qwertyuiop: 1");
  ASSERT_FALSE(far.ok());
  EXPECT_EQ(
      far.status().message().rfind("qwertyuiop: unknown key (value '1'; expected one of: ", 0), 0u)
      << far.status().message();
}

class ConfigFile : public testing::Test {
 protected:
  void SetUp() override {
    path_ = (std::filesystem::path(testing::TempDir()) / "config_file_test.yaml").string();
  }
  void TearDown() override { std::filesystem::remove(path_); }
  void Write(const std::string& yaml) {
    std::ofstream out(path_);
    out << yaml;
  }
  std::string Error(const std::vector<std::string>& overrides) {
    auto c = LoadRunConfig(path_, overrides);
    return c.ok() ? "(ok)" : std::string(c.status().message());
  }
  std::string path_;
};

TEST_F(ConfigFile, AnErrorFromSetNamesSetNotTheFile) {
  Write("steps: 100\nquant: {activations: {target: 4}}\n");
  EXPECT_EQ(Error({"steps=0"}), "--set steps=0: steps: 0 is outside >= 1");
  EXPECT_EQ(Error({"stepz=3"}).rfind("--set stepz=3: stepz: unknown key", 0), 0u)
      << Error({"stepz=3"});
  EXPECT_EQ(Error({"quant.activations.target=1"})
                .rfind("--set quant.activations.target=1: quant.activations.target[0].bits", 0),
            0u);
  // A --set of a map blames the assignment for a bad key inside it.
  EXPECT_EQ(Error({"optim={lr: -1}"}).rfind("--set optim={lr: -1}: optim.lr:", 0), 0u);
  // A --set with an index (not a key path splitq knows) is still the --set's error.
  EXPECT_EQ(Error({"quant.activations.target[0].bits=3"})
                .rfind("--set quant.activations.target[0].bits=3: ", 0),
            0u)
      << Error({"quant.activations.target[0].bits=3"});
  // Of two --set of one key the last one counts, and is named.
  EXPECT_EQ(Error({"steps=5", "steps=-1"}).rfind("--set steps=-1:", 0), 0u);
}

TEST_F(ConfigFile, AnErrorInTheFileNamesTheFile) {
  Write("steps: 0\n");
  EXPECT_EQ(Error({"optim.lr=0.01"}), path_ + ": steps: 0 is outside >= 1");
  Write("steps: 10\n");
  EXPECT_EQ(Error({"optim.lr=0.01"}), "(ok)");
}

TEST(RunConfig, MissingFileAndBadYamlNameTheFile) {
  auto missing = LoadRunConfig("/nonexistent/run.yaml");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().message(), "/nonexistent/run.yaml: no such file");
  auto folder = LoadRunConfig(testing::TempDir());
  ASSERT_FALSE(folder.ok());
  EXPECT_NE(folder.status().message().find("a folder, not a config file"), std::string::npos);
}

TEST(RunConfig, ReferenceListsEveryKey) {
  const std::string ref = ConfigReference();
  for (const char* key : {"task", "model.split_after", "quant.activations.gate.lambda",
                          "quant.gradients.rounding", "lora.targets", "quant.weights.input_bits"}) {
    EXPECT_NE(ref.find(std::string("`") + key + "`"), std::string::npos) << key;
  }
}

// docs/configuration.md shows the table the parser uses (regenerate it with `splitq config
// reference` when a key changes).
TEST(RunConfig, TheDocumentedTableIsTheParsersTable) {
  std::ifstream in(std::filesystem::path(SPLITQ_SOURCE_DIR) / "docs" / "configuration.md");
  std::stringstream text;
  text << in.rdbuf();
  EXPECT_NE(text.str().find(ConfigReference()), std::string::npos)
      << "docs/configuration.md is not the output of `splitq config reference`";
  // The ranges in the table are the ones the parser enforces.
  EXPECT_NE(ConfigReference().find("| `batch_size` | integer 1..1048576 |"), std::string::npos);
  ExpectError("batch_size: 1048577", "batch_size: 1048577 is outside 1..1048576");
  ExpectError("model: {width: 8193}", "model.width: 8193 is outside 8..8192");
  ExpectError("optim: {lr: 0}", "optim.lr: 0 is outside (0, 10]");
  ExpectError("server: {merge: {max_clients: 0}}",
              "server.merge.max_clients: 0 is outside 1..1024");
  ExpectError("server: {merge: {window_ms: 1001}}",
              "server.merge.window_ms: 1001 is outside [0, 1000]");
  ExpectError("quant: {activations: {bits: {min: 5, max: 4}}}",
              "quant.activations.bits.max: 4 is below quant.activations.bits.min 5");
}

TEST(RunConfig, EveryShippedConfigParses) {
  const std::filesystem::path dir = std::filesystem::path(SPLITQ_SOURCE_DIR) / "configs";
  int count = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.path().extension() != ".yaml") continue;
    ++count;
    auto c = LoadRunConfig(entry.path().string());
    EXPECT_TRUE(c.ok()) << entry.path() << ": " << c.status();
  }
  EXPECT_GE(count, 9);
}

}  // namespace
}  // namespace splitq::trainer
