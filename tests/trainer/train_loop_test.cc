// Runs of trainer/train_loop.h. Smoke runs, one per task and wire mode (fp32, uniform, AMAQ,
// AQ-SGD, U-shaped): the loss falls clearly below its start, no frame exceeds the budget (the
// loop also refuses such a frame with an error), the files a user reads are written, and the
// wire carries far fewer bytes than fp32 would. Then checkpoints: a resumed run gives the
// same curve bit for bit; --init and LoRA; and the errors a user can run into.
#include "trainer/train_loop.h"

#include <ftw.h>
#include <gtest/gtest.h>
#include <malloc.h>
#include <torch/cuda.h>
#include <torch/serialize/input-archive.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include "base/files.h"
#include "trainer/client_part.h"
#include "trainer/datasets.h"
#include "trainer/models.h"

namespace splitq::trainer {
namespace {

RunConfig ConfigFrom(const std::string& yaml) {
  auto c = ParseRunConfig(YAML::Load(yaml));
  EXPECT_TRUE(c.ok()) << c.status();
  return *c;
}

// Keep freed blocks in the heap, as `splitq` does: fresh pages are slow on some VMs.
const int kMallopt = [] {
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  return 0;
}();

std::string OutDir(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("splitq_train_" + name)).string();
}

void RemoveTree(const std::string& dir) { base::RemoveTree(dir); }

// Runs of a test start over in their folder, whatever an earlier run of the test left there
// (AFolderThatHoldsARunIsKept tests the refusal itself).
TrainOptions Options(const std::string& name) {
  TrainOptions o;
  o.out_dir = OutDir(name);
  o.overwrite = true;
  return o;
}

TrainSummary RunOrFail(const RunConfig& c, const std::string& name) {
  auto summary = Train(c, Options(name));
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

// A StepRunner whose step `fail_at` fails (as a networked client's does when it is interrupted
// while reconnecting), after setting the interrupt flag.
class FailingRunner : public StepRunner {
 public:
  // `fail_validation`: the validation pass fails instead (interrupted likewise).
  FailingRunner(RunConfig c, int64_t fail_at, std::atomic<bool>* interrupt,
                bool fail_validation = false)
      : c_(std::move(c)),
        fail_at_(fail_at),
        interrupt_(interrupt),
        fail_validation_(fail_validation) {}
  absl::StatusOr<StepStats> Step() override {
    if (step_ + 1 == fail_at_ && !fail_validation_) {
      interrupt_->store(true);
      return absl::CancelledError("interrupted");
    }
    ++step_;
    StepStats stats;  // by name: StepStats gains fields (the phases came before the bit map)
    stats.loss = 1.0;
    stats.act_bits = 4;
    stats.grad_bits = 8;
    stats.step_ms = 1;
    return stats;
  }
  absl::StatusOr<EvalStats> Evaluate() override {
    if (fail_validation_) {
      interrupt_->store(true);
      return absl::CancelledError("interrupted");
    }
    return EvalStats{1.0, 0.5, -1};
  }
  absl::Status SaveCheckpoint(const std::string& path, const std::vector<double>&) const override {
    saved_at_.push_back(step_);
    std::ofstream(path) << step_;
    return absl::OkStatus();
  }
  absl::Status LoadCheckpoint(const std::string&, std::vector<double>*) override {
    return absl::UnimplementedError("not here");
  }
  int64_t step() const override { return step_; }
  const RunConfig& config() const override { return c_; }
  WireTotals wire() const override { return {}; }
  std::string device() const override { return "cpu"; }
  const std::vector<int64_t>& saved_at() const { return saved_at_; }

 private:
  RunConfig c_;
  int64_t fail_at_;
  std::atomic<bool>* interrupt_;
  bool fail_validation_;
  int64_t step_ = 0;
  mutable std::vector<int64_t> saved_at_;
};

// A step that an interrupt cuts short writes no checkpoint of a half-done step: CANCELLED, naming
// the step and the checkpoint that holds the state (or that there is none yet).
TEST(TrainLoop, AStepCutShortByAnInterruptNamesTheCheckpointToResumeFrom) {
  RunConfig c = ConfigFrom("task: fmnist\nsteps: 20\n");
  c.checkpoint_every = 4;
  c.eval_every = 100;
  c.log_every = 1;
  for (const int64_t fail_at : {7, 3}) {
    std::atomic<bool> interrupt{false};
    FailingRunner runner(c, fail_at, &interrupt);
    TrainOptions o = Options("cut_short_" + std::to_string(fail_at));
    RemoveTree(o.out_dir);
    o.interrupt = &interrupt;
    const absl::Status s = RunTraining(runner, o).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kCancelled) << s;
    EXPECT_NE(s.message().find("during step " + std::to_string(fail_at)), std::string::npos) << s;
    if (fail_at == 7) {
      EXPECT_EQ(runner.saved_at(), std::vector<int64_t>{4});
      EXPECT_NE(s.message().find("checkpoint.pt holds the last checkpoint"), std::string::npos)
          << s;
      EXPECT_NE(s.message().find("continue with --resume"), std::string::npos) << s;
    } else {
      EXPECT_TRUE(runner.saved_at().empty());
      EXPECT_NE(s.message().find("no checkpoint was written yet"), std::string::npos) << s;
    }
    RemoveTree(o.out_dir);
  }
  // A validation pass cut short: the step before it is complete, and its state is saved.
  c.eval_every = 5;
  std::atomic<bool> interrupt{false};
  FailingRunner runner(c, 0, &interrupt, /*fail_validation=*/true);
  TrainOptions o = Options("cut_short_validation");
  RemoveTree(o.out_dir);
  o.interrupt = &interrupt;
  // A networked client resumes without --resume: its messages say what does.
  o.resume_hint = "run the same command again";
  const absl::Status s = RunTraining(runner, o).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kCancelled) << s;
  EXPECT_NE(s.message().find("validation after step 5"), std::string::npos) << s;
  EXPECT_NE(s.message().find("(run the same command again)"), std::string::npos) << s;
  EXPECT_EQ(s.message().find("--resume"), std::string::npos) << s;
  EXPECT_EQ(runner.saved_at(), (std::vector<int64_t>{4, 5}));
  RemoveTree(o.out_dir);
}

// Warm-up, then cosine decay to zero; a negative step (never from a real run) counts as 0, so no
// step can give a negative or non-finite rate.
TEST(LearningRate, WarmsUpDecaysAndIsNeverNegative) {
  RunConfig c;
  c.steps = 100;
  c.warmup_steps = 10;
  EXPECT_DOUBLE_EQ(LearningRateAt(c, 0, 1.0), 0.1);
  EXPECT_DOUBLE_EQ(LearningRateAt(c, 9, 1.0), 1.0);
  EXPECT_DOUBLE_EQ(LearningRateAt(c, 10, 1.0), 1.0);
  EXPECT_NEAR(LearningRateAt(c, 55, 1.0), 0.5, 1e-12);
  EXPECT_NEAR(LearningRateAt(c, 100, 1.0), 0.0, 1e-12);
  EXPECT_NEAR(LearningRateAt(c, int64_t{1} << 53, 1.0), 0.0, 1e-12);
  for (const int64_t step : {int64_t{-1}, int64_t{-1000}, std::numeric_limits<int64_t>::min()}) {
    EXPECT_DOUBLE_EQ(LearningRateAt(c, step, 1.0), 0.1) << step;
  }
  c.warmup_steps = 0;
  EXPECT_DOUBLE_EQ(LearningRateAt(c, -1, 1.0), 1.0);
}

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
  // Wire bits per element: bytes x 8 over the elements (a little above the codes' bits, the
  // scales and headers counted); the codes' entropy is at most their width, and every
  // quantized element is measured.
  const double elements = static_cast<double>(s.bytes_fp32_equivalent) / 8;
  EXPECT_EQ(s.entropy.elements_up, s.bytes_fp32_equivalent / 8);
  EXPECT_EQ(s.entropy.elements_down, s.bytes_fp32_equivalent / 8);
  EXPECT_GT(s.entropy.bits_up, 0);
  EXPECT_LT(s.entropy.bits_up, 8.0 * s.bytes_up);  // below the codes' own bits
  EXPECT_LT(s.entropy.bits_down, 8.0 * s.bytes_down);
  auto read = ReadSummary((std::filesystem::path(OutDir("amaq")) / "summary.json").string());
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_NEAR(read->entropy.bits_up / elements, s.entropy.bits_up / elements, 1e-3);
  EXPECT_NEAR(read->entropy.bits_down / elements, s.entropy.bits_down / elements, 1e-3);
  std::ifstream metrics(std::filesystem::path(OutDir("amaq")) / "metrics.jsonl");
  int lines = 0;
  size_t map_size = 0;
  for (std::string line; std::getline(metrics, line);) {
    EXPECT_NE(line.find("\"act_bits\""), std::string::npos);
    const auto number = [&](const std::string& key) {
      const size_t at = line.find("\"" + key + "\": ");
      return at == std::string::npos ? -1.0 : std::stod(line.substr(at + key.size() + 4));
    };
    // The window's wire bits sit a little above its mean act bits; its code entropy below.
    const double act = number("act_bits"), wire = number("wire_bits_up");
    EXPECT_GT(wire, act) << line;
    EXPECT_LT(wire, act + 0.5) << line;
    EXPECT_GT(number("code_entropy_bits_up"), 0) << line;
    EXPECT_LE(number("code_entropy_bits_up"), act + 1e-3) << line;
    EXPECT_LE(number("code_entropy_bits_down"), 6 + 1e-3) << line;
    EXPECT_GT(number("act_budget"), 0) << line;  // the window's budget
    // The logged step's bits per channel, a digit each, as many as the first line's.
    const size_t map = line.find("\"act_bit_map\": \"");
    ASSERT_NE(map, std::string::npos) << line;
    const std::string digits = line.substr(map + 16, line.find('"', map + 16) - (map + 16));
    EXPECT_EQ(digits.find_first_not_of("12345678"), std::string::npos) << digits;
    if (map_size == 0) map_size = digits.size();
    EXPECT_GT(digits.size(), 0u);
    EXPECT_EQ(digits.size(), map_size);
    ++lines;
  }
  EXPECT_EQ(lines, 6);
}

// quant.activations.budget: bytes: the target counts coded payload bits per element. AMAQ
// prices each channel's bits at what the coder made of them, so the frames end near the coded
// target while carrying more nominal bits than a bits budget of the same number would allow
// (the post-ReLU activations code well below their width).
TEST_F(FashionMnistSmoke, AmaqMeetsABudgetInCodedBytes) {
  const RunConfig c = ConfigFrom(R"(
task: fmnist
steps: 60
batch_size: 32
log_every: 10
optim: {warmup_steps: 5}
quant:
  activations: {mode: amaq, bits: {min: 1, max: 8}, coding: rans, budget: bytes,
                target: [{step: 0, bits: 8}, {step: 40, bits: 2}]}
  gradients: {mode: uniform, target: 6}
)");
  const TrainSummary s = RunOrFail(c, "amaq_bytes");
  EXPECT_LT(s.last_loss, 0.7 * s.first_loss);
  EXPECT_GT(s.val_accuracy, 0.5);
  std::ifstream metrics(std::filesystem::path(OutDir("amaq_bytes")) / "metrics.jsonl");
  std::string last;
  for (std::string line; std::getline(metrics, line);) last = line;
  const auto number = [&](const std::string& key) {
    const size_t at = last.find("\"" + key + "\": ");
    return at == std::string::npos ? -1.0 : std::stod(last.substr(at + key.size() + 4));
  };
  const double act = number("act_bits"), wire = number("wire_bits_up");
  std::printf(
      "budget 2 coded bits: last window %.3f nominal bits, %.3f wire bits up; max excess "
      "%.3f\n",
      act, wire, s.max_budget_excess);
  EXPECT_GT(act, 2.1);   // nominal bits above the coded budget (2.32 when written)
  EXPECT_LT(wire, 2.3);  // the coded payload near the budget (headers and scales on top)
  EXPECT_LT(s.max_budget_excess, 0.5);

  // A coded target below bits.min from the first frame on (before any price is measured, and
  // with micro-batches that recompute the sent frame): it trains, every channel at bits.min,
  // the coded payload as low as that goes.
  const RunConfig low = ConfigFrom(R"(
task: fmnist
steps: 6
batch_size: 32
log_every: 3
client: {micro_batches: 2}
quant:
  activations: {mode: amaq, coding: rans, budget: bytes, target: 0.6}
  gradients: {mode: uniform, target: 6}
)");
  const TrainSummary t = RunOrFail(low, "amaq_bytes_low");
  EXPECT_DOUBLE_EQ(t.avg_act_bits, 2.0);
  EXPECT_GT(t.max_budget_excess, 0.0);  // out of reach at 2 bits a channel
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

std::string WriteCorpus() {
  const std::string corpus = OutDir("corpus.txt");
  std::ofstream f(corpus);
  for (int i = 0; i < 400; ++i) f << "the quick brown fox jumps over the lazy dog. ";
  return corpus;
}

// A small language model on a user corpus, with `--set`-style overrides.
RunConfig SmallLm(const std::vector<std::string>& sets = {}) {
  YAML::Node root = YAML::Load(R"(
task: lm
steps: 40
batch_size: 8
log_every: 10
model: {layers: 2, width: 32, heads: 2, context: 32, split_after: 1}
data: {corpus: )" + WriteCorpus() +
                               R"(, validation_fraction: 0.1}
optim: {lr: 0.003, warmup_steps: 5}
)");
  for (const std::string& set : sets) EXPECT_TRUE(ApplyOverride(root, set).ok()) << set;
  auto c = ParseRunConfig(root);
  EXPECT_TRUE(c.ok()) << c.status();
  return *c;
}

TEST(TrainLoop, LanguageModelOnAUserCorpusLearns) {
  const RunConfig c =
      SmallLm({"quant.activations.mode=amaq",
               "quant.activations.target=[{step: 0, bits: 8}, {step: 30, bits: 4}]"});
  const TrainSummary s = RunOrFail(c, "lm");
  EXPECT_LT(s.last_loss, 0.7 * s.first_loss);
  EXPECT_GT(s.val_bits_per_byte, 0.0);
  EXPECT_LT(s.val_accuracy, 0.0);  // null for a language model
  EXPECT_LE(s.max_budget_excess, 0.0);
}

// Token granularity (uniform and AQ-SGD): a scale, offset and width per token, the frame
// carrying [B*T, C]; the run learns as the per-channel one does, and its frames cost the
// per-token scales on top: a scale and an offset (8 bytes; the bit map goes only when it
// changes) per token of C = 32 values, 2 bits per element, against 8 bytes per channel of
// B*T = 256 values.
TEST(TrainLoop, TokenScalesLearnAndCostTheirScales) {
  for (const char* mode : {"uniform", "aqsgd"}) {
    std::vector<double> wire;
    for (const char* granularity : {"channel", "token"}) {
      const RunConfig c =
          SmallLm({std::string("quant.activations.mode=") + mode,
                   "quant.activations.bits={min: 4, max: 4}", "quant.activations.target=4",
                   std::string("quant.activations.granularity=") + granularity});
      const TrainSummary s = RunOrFail(c, std::string("tok_") + mode + "_" + granularity);
      EXPECT_LT(s.last_loss, 0.7 * s.first_loss) << mode << " " << granularity;
      EXPECT_GT(s.val_bits_per_byte, 0.0);
      wire.push_back(8.0 * static_cast<double>(s.bytes_up) /
                     (static_cast<double>(s.bytes_fp32_equivalent) / 8));
    }
    std::printf("%s: wire bits up, per channel %.3f, per token %.3f\n", mode, wire[0], wire[1]);
    EXPECT_NEAR(wire[1] - wire[0], 8.0 * 8 / 32 - 8.0 * 8 / 256, 0.2) << mode;
  }
  RunConfig amaq = SmallLm({"quant.activations.granularity=token"});
  EXPECT_EQ(CheckSupported(amaq).code(), absl::StatusCode::kUnimplemented);
}

TEST(TrainLoop, UShapedRunsLearnWithTwoBoundaries) {
  for (const char* mode : {"amaq", "aqsgd"}) {
    const RunConfig c =
        SmallLm({"model.layers=3", "model.u_shaped=true",
                 std::string("quant.activations.mode=") + mode, "quant.activations.target=4"});
    const TrainSummary s = RunOrFail(c, std::string("u_") + mode);
    EXPECT_LT(s.last_loss, 0.7 * s.first_loss) << mode;
    EXPECT_LE(s.max_budget_excess, 0.0) << mode;
    EXPECT_LE(s.avg_act_bits, 4.0) << mode;
    // Two boundaries: activations and gradients cross both ways.
    EXPECT_GT(s.bytes_up, 0);
    EXPECT_GT(s.bytes_down, 0);
    EXPECT_EQ(s.bytes_fp32_equivalent, 40 * 2 * 2 * 4 * 8 * 32 * 32) << mode;
  }
}

TEST_F(FashionMnistSmoke, UShapedAmaqLearns) {
  const RunConfig c = ConfigFrom(R"(
task: fmnist
steps: 40
batch_size: 32
log_every: 10
optim: {warmup_steps: 5}
model: {split_after: 1, u_shaped: true}
quant: {activations: {mode: amaq, target: [{step: 0, bits: 8}, {step: 30, bits: 3}]}}
)");
  const TrainSummary s = RunOrFail(c, "u_fmnist");
  EXPECT_LT(s.last_loss, 0.7 * s.first_loss);
  EXPECT_LE(s.max_budget_excess, 0.0);
}

// Reads the AQ-SGD cache `key` of a checkpoint as rows sorted by sample id.
at::Tensor SortedCache(torch::serialize::InputArchive& archive, const std::string& key) {
  at::Tensor ids, values;
  archive.read(key + ".ids", ids);
  archive.read(key + ".values", values);
  return values.index_select(0, std::get<1>(ids.sort()));
}

TEST(TrainLoop, AqSgdLearnsAndBothCachesStayIdentical) {
  // 40 steps of 8 windows over ~560 windows of text: many samples come back.
  const RunConfig c =
      SmallLm({"batch_size=32", "quant.activations.mode=aqsgd", "quant.activations.target=3"});
  const TrainSummary s = RunOrFail(c, "aqsgd");
  EXPECT_LT(s.last_loss, 0.7 * s.first_loss);
  EXPECT_LE(s.avg_act_bits, 3.0);
  // Checkpoints hold weights learned from private data: 0600 whatever the umask.
  const auto perms =
      std::filesystem::status(std::filesystem::path(OutDir("aqsgd")) / "checkpoint.pt")
          .permissions();
  EXPECT_EQ(perms & std::filesystem::perms::all,
            std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  torch::serialize::InputArchive archive;
  archive.load_from((std::filesystem::path(OutDir("aqsgd")) / "checkpoint.pt").string());
  const at::Tensor sender = SortedCache(archive, "aqsgd.0.sender");
  const at::Tensor receiver = SortedCache(archive, "aqsgd.0.receiver");
  EXPECT_GT(sender.size(0), 32);
  EXPECT_TRUE(at::equal(sender, receiver));
  EXPECT_GT(sender.abs().sum().item<double>(), 0.0);
}

std::vector<std::string> CurveOf(const std::string& dir) {
  // The metric lines without step_ms and the byte counters (a resumed run resends the bit map).
  std::vector<std::string> out;
  std::ifstream f(std::filesystem::path(dir) / "metrics.jsonl");
  for (std::string line; std::getline(f, line);)
    out.push_back(line.substr(0, line.find(", \"bytes_up\"")));
  return out;
}

void ExpectResumeIsBitIdentical(const RunConfig& c, const std::string& name) {
  const TrainSummary whole = RunOrFail(c, name + "_whole");
  TrainOptions first = Options(name + "_resumed");
  first.stop_after = 15;
  EXPECT_EQ(Train(c, first).status().code(), absl::StatusCode::kCancelled);
  TrainOptions second = Options(name + "_resumed");
  second.resume = true;
  auto resumed = Train(c, second);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  const auto a = CurveOf(OutDir(name + "_whole")), b = CurveOf(OutDir(name + "_resumed"));
  ASSERT_EQ(a.size(), static_cast<size_t>(c.steps / c.log_every));
  EXPECT_EQ(a, b);
  EXPECT_EQ(whole.val_loss, resumed->val_loss);  // bit for bit
  EXPECT_EQ(whole.avg_act_bits, resumed->avg_act_bits);
  EXPECT_EQ(whole.max_budget_excess, resumed->max_budget_excess);
}

TEST_F(FashionMnistSmoke, ResumeGivesTheSameCurveBitForBit) {
  const RunConfig c = ConfigFrom(R"(
task: fmnist
steps: 30
batch_size: 32
log_every: 5
checkpoint_every: 10
optim: {warmup_steps: 5}
quant:
  activations: {mode: amaq, target: [{step: 0, bits: 8}, {step: 20, bits: 3}]}
  gradients: {mode: uniform, target: 6}
)");
  ExpectResumeIsBitIdentical(c, "resume_fmnist");
}

TEST(TrainLoop, ResumeOfAUShapedAqSgdRunIsBitIdentical) {
  const RunConfig c = SmallLm({"steps=30", "log_every=5", "checkpoint_every=10", "model.layers=3",
                               "model.u_shaped=true", "quant.activations.mode=aqsgd",
                               "quant.activations.target=4"});
  ExpectResumeIsBitIdentical(c, "resume_lm");
}

TEST(TrainLoop, LoraFineTuneStartsFromTheInitCheckpointAndTrainsOnlyAdapters) {
  const TrainSummary base =
      RunOrFail(SmallLm({"quant.activations.mode=fp32", "quant.gradients.mode=fp32"}), "lora_base");
  const std::string base_ckpt =
      (std::filesystem::path(OutDir("lora_base")) / "checkpoint.pt").string();
  const RunConfig lora = SmallLm({"lora.rank=4", "lora.alpha=8", "lora.targets=[qkv, fc1]",
                                  "quant.activations.mode=amaq", "quant.activations.target=4"});
  // Without --init a LoRA run is refused: it would fine-tune a random model.
  EXPECT_EQ(Train(lora, Options("lora")).status().code(), absl::StatusCode::kInvalidArgument);
  TrainOptions o = Options("lora");
  o.init_checkpoint = base_ckpt;
  auto tuned = Train(lora, o);
  ASSERT_TRUE(tuned.ok()) << tuned.status();
  // It starts where the base ended, far below a fresh model's first loss.
  EXPECT_LT(tuned->first_loss, 0.8 * base.first_loss);
  // A LoRA run's checkpoint is not a base: its adapters would be dropped.
  TrainOptions from_lora = Options("lora_again");
  from_lora.init_checkpoint = (std::filesystem::path(OutDir("lora")) / "checkpoint.pt").string();
  EXPECT_EQ(Train(lora, from_lora).status().code(), absl::StatusCode::kFailedPrecondition);
  // Resuming a LoRA run needs no --init: the checkpoint holds the whole model.
  TrainOptions resume = Options("lora");
  resume.resume = true;
  EXPECT_TRUE(Train(lora, resume).ok());

  // The base weights are unchanged; the adapters moved.
  auto load = [](const std::string& path, bool with_lora) {
    TransformerOptions t;
    t.layers = 2;
    t.width = 32;
    t.heads = 2;
    t.context = 32;
    t.split_after = 1;
    SplitModel m = ByteTransformer(t);
    if (with_lora) ApplyLora(m, {"qkv", "fc1"}, LoraOptions{4, 8});
    torch::serialize::InputArchive archive;
    archive.load_from(path);
    int i = 0;
    for (auto* part : {&m.client, &m.server, &m.head}) {
      for (const auto& block : (*part)->children()) {
        torch::serialize::InputArchive a;
        archive.read("block." + std::to_string(i++), a);
        block->load(a);
      }
    }
    return m;
  };
  SplitModel before = load(base_ckpt, false);
  SplitModel after = load((std::filesystem::path(OutDir("lora")) / "checkpoint.pt").string(), true);
  int compared = 0, adapters_moved = 0;
  for (int part = 0; part < 2; ++part) {
    const auto b = (part == 0 ? before.client : before.server)->named_parameters();
    for (const auto& item : (part == 0 ? after.client : after.server)->named_parameters()) {
      const std::string& name = item.key();
      if (name.find("lora_b") != std::string::npos) {
        adapters_moved += item.value().abs().sum().template item<double>() > 0;
      } else if (name.find("lora_a") == std::string::npos) {
        EXPECT_TRUE(at::equal(item.value(), b[name])) << name;
        ++compared;
      }
    }
  }
  EXPECT_GT(compared, 10);
  EXPECT_EQ(adapters_moved, 4);  // qkv and fc1 in each of the 2 layers
}

std::string Slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream all;
  all << in.rdbuf();
  return all.str();
}

// A folder that holds a run is refused, untouched, unless the caller resumes it or says to
// start over; the progress lines show the budget next to the bits.
TEST(TrainLoop, AFolderThatHoldsARunIsKept) {
  const RunConfig c =
      SmallLm({"steps=4", "log_every=2", "eval_every=4",
               "quant.activations.target=[{step: 0, bits: 8}, {step: 4, bits: 4}]"});
  TrainOptions first = Options("kept");
  RemoveTree(first.out_dir);
  first.overwrite = false;
  std::vector<std::string> lines;
  first.progress = [&lines](const std::string& line) { lines.push_back(line); };
  ASSERT_TRUE(Train(c, first).ok());
  ASSERT_EQ(lines.size(), 3u);  // the budget note, then steps 2 and 4
  EXPECT_NE(lines[0].find("budget B*(t) goes 8.00 -> 5.00"), std::string::npos) << lines[0];
  // Steps 1-2 have the budgets 8 and 7; steps 3-4 have 6 and 5.
  EXPECT_NE(lines[1].find("(budget 7.50)"), std::string::npos) << lines[1];
  EXPECT_NE(lines[2].find("(budget 5.50)"), std::string::npos) << lines[2];
  const std::string metrics = Slurp(first.out_dir + "/metrics.jsonl");
  const std::string summary = Slurp(first.out_dir + "/summary.json");
  EXPECT_NE(summary.find("\"act_budget\": 5.500000"), std::string::npos) << summary;

  TrainOptions again = Options("kept");
  again.overwrite = false;
  auto refused = Train(c, again);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.status().message().find("already holds a finished run (summary.json); "
                                            "nothing was changed. --resume continues it, --force"),
            std::string::npos)
      << refused.status();
  EXPECT_EQ(Slurp(first.out_dir + "/metrics.jsonl"), metrics);
  EXPECT_EQ(Slurp(first.out_dir + "/summary.json"), summary);

  // A stopped run says so; --resume finishes it.
  TrainOptions stopped = Options("kept_stopped");
  RemoveTree(stopped.out_dir);
  stopped.stop_after = 2;
  EXPECT_EQ(Train(c, stopped).status().code(), absl::StatusCode::kCancelled);
  stopped.stop_after = -1;
  stopped.overwrite = false;
  refused = Train(c, stopped);
  EXPECT_NE(refused.status().message().find("already holds a stopped run (checkpoint.pt)"),
            std::string::npos)
      << refused.status();
  stopped.resume = true;
  auto resumed = Train(c, stopped);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  // The code entropy's counters come back with the checkpoint: every element of the run is
  // measured, the steps before the stop too.
  EXPECT_EQ(resumed->entropy.elements_up, resumed->bytes_fp32_equivalent / 8);

  // A log that is a symbolic link is refused, with --force too: the run would write through it
  // (the sixth outside probe overwrote another file this way).
  TrainOptions linked = Options("kept_linked");
  RemoveTree(linked.out_dir);
  std::filesystem::create_directories(linked.out_dir);
  const std::string victim = linked.out_dir + ".victim";
  std::ofstream(victim) << "not the run's\n";
  std::filesystem::create_symlink(victim, linked.out_dir + "/metrics.jsonl");
  linked.overwrite = true;
  refused = Train(c, linked);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
  EXPECT_NE(refused.status().message().find("symbolic link"), std::string::npos)
      << refused.status();
  EXPECT_EQ(Slurp(victim), "not the run's\n");
  RemoveTree(linked.out_dir);
  std::filesystem::remove(victim);

  // --force starts over: the old summary goes at once, a new one comes at the end.
  again.overwrite = true;
  again.stop_after = 2;
  EXPECT_EQ(Train(c, again).status().code(), absl::StatusCode::kCancelled);
  EXPECT_FALSE(std::filesystem::exists(first.out_dir + "/summary.json"));
  RemoveTree(first.out_dir);
  RemoveTree(stopped.out_dir);
}

// --force removes the old run's checkpoint and summary at once: a new run cut short before its
// first checkpoint leaves nothing of the old one to resume by mistake.
TEST(TrainLoop, ForceLeavesNothingOfTheOldRunToResume) {
  RunConfig c = ConfigFrom("task: fmnist\nsteps: 20\n");
  c.checkpoint_every = 10;
  TrainOptions o = Options("force_old_run");
  RemoveTree(o.out_dir);
  std::filesystem::create_directories(o.out_dir);
  std::ofstream(o.out_dir + "/checkpoint.pt") << "the old run's";
  std::ofstream(o.out_dir + "/summary.json") << "{}";
  std::atomic<bool> interrupt{false};
  FailingRunner runner(c, 3, &interrupt);  // cut short at step 3, before any checkpoint
  o.interrupt = &interrupt;
  const absl::Status s = RunTraining(runner, o).status();
  EXPECT_NE(s.message().find("no checkpoint was written yet"), std::string::npos) << s;
  EXPECT_FALSE(std::filesystem::exists(o.out_dir + "/checkpoint.pt"));
  EXPECT_FALSE(std::filesystem::exists(o.out_dir + "/summary.json"));
  RemoveTree(o.out_dir);
}

TEST(TrainSummary, SaysTheSavingAgainstFp32AndTheBudgets) {
  TrainSummary s;
  s.task = "fmnist";
  s.steps = 800;
  s.clients = 2;
  s.wall_seconds = 36;
  s.device = "cpu";
  s.val_accuracy = 0.8647;
  s.val_loss = 0.3782;
  s.bytes_up = 90'000'000;
  s.bytes_down = 110'000'000;
  s.bytes_fp32_equivalent = 1'200'000'000;
  s.avg_act_bits = 3.12;
  s.act_budget = 4;
  s.avg_grad_bits = 6;
  s.grad_budget = 6;
  const std::string text = FormatSummary(s);
  EXPECT_NE(text.find("fmnist: 2 clients x 400 steps (800 client steps) in 36.0 s on cpu; "
                      "val accuracy 0.8647 (mean over clients), val loss 0.3782\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("wire 200.0 MB up+down vs 1200.0 MB at fp32: 6.0x less (90.0 MB up, "
                      "110.0 MB down)\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("activations 3.12 (budget 4.00), gradients 6.00 (budget 6.00)"),
            std::string::npos)
      << text;
  s.clients = 1;
  s.steps = 400;
  s.act_budget = s.grad_budget = -1;
  s.avg_act_bits = s.avg_grad_bits = 32;
  s.bytes_up = 600'000'000;
  s.bytes_down = 600'000'000;
  const std::string fp32 = FormatSummary(s);
  EXPECT_EQ(fp32.rfind("fmnist: 400 steps in", 0), 0u) << fp32;
  EXPECT_NE(fp32.find("1.0x less"), std::string::npos) << fp32;
  EXPECT_NE(fp32.find("activations fp32, gradients fp32"), std::string::npos) << fp32;
}

// summary.json carries a networked client's lost steps only when it has them to tell
// (steps_lost >= 0), and reads them back.
TEST(TrainSummary, LostStepsGoThroughSummaryJson) {
  const std::string dir = OutDir("lost_steps");
  RemoveTree(dir);
  std::filesystem::create_directories(dir);
  const std::string path = dir + "/summary.json";
  TrainSummary s;
  s.task = "fmnist";
  s.device = "cpu";
  ASSERT_TRUE(WriteSummary(s, path).ok());
  auto back = ReadSummary(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->steps_lost, -1);
  EXPECT_TRUE(back->lost_steps.empty());
  s.steps_lost = 13;
  s.lost_steps = {{40, 49}, {97, 99}};
  ASSERT_TRUE(WriteSummary(s, path).ok());
  back = ReadSummary(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->steps_lost, 13);
  EXPECT_EQ(back->lost_steps, s.lost_steps);
  RemoveTree(dir);
}

TEST(TrainSummary, BudgetsFollowTheSchedulesAsTheBoundarySendsThem) {
  RunConfig c = ConfigFrom(
      "quant: {activations: {mode: amaq, target: [{step: 0, bits: 8}, {step: 100, bits: 4}]}, "
      "gradients: {mode: uniform, target: 6.5}}");
  EXPECT_DOUBLE_EQ(ActivationBudgetAt(c, 50), 6.0);
  EXPECT_DOUBLE_EQ(GradientBudgetAt(c, 50), 6.0);  // whole bits: 6.5 sends 6
  c.activations.mode = WireMode::kUniform;
  EXPECT_DOUBLE_EQ(ActivationBudgetAt(c, 50), 6.0);
  EXPECT_DOUBLE_EQ(ActivationBudgetAt(c, 60), 5.0);  // 5.6 sends 5
  c.activations.mode = WireMode::kFloat32;
  c.gradients.mode = WireMode::kFloat32;
  EXPECT_EQ(ActivationBudgetAt(c, 50), -1);
  EXPECT_EQ(GradientBudgetAt(c, 50), -1);
}

TEST(TrainLoop, ErrorsNameTheProblem) {
  const RunConfig c = SmallLm();
  // Resume with nothing to resume from.
  TrainOptions o = Options("no_checkpoint");
  RemoveTree(o.out_dir);
  o.resume = true;
  auto r = Train(c, o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  // --init from a model of another shape.
  ASSERT_TRUE(Train(SmallLm({"steps=2"}), Options("shape_a")).ok());
  const RunConfig wider = SmallLm({"model.width=64"});
  TrainOptions init = Options("shape_b");
  init.init_checkpoint = (std::filesystem::path(OutDir("shape_a")) / "checkpoint.pt").string();
  r = Train(wider, init);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(r.status().message().find("model.width"), std::string::npos) << r.status();
  // Resume into a run with another boundary mode.
  const RunConfig other =
      SmallLm({"steps=2", "quant.activations.mode=uniform", "quant.activations.target=4"});
  TrainOptions resume = Options("shape_a");
  resume.resume = true;
  r = Train(other, resume);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(r.status().message().find("quant.activations.mode"), std::string::npos) << r.status();
  // bf16 autocast is for CUDA.
  const RunConfig bf16 = SmallLm({"device=cpu", "optim.bf16_autocast=true"});
  EXPECT_EQ(Train(bf16, Options("bf16")).status().code(), absl::StatusCode::kInvalidArgument);
  if (!torch::cuda::is_available()) {
    const RunConfig cuda = SmallLm({"device=cuda"});
    EXPECT_EQ(Train(cuda, Options("cuda")).status().code(), absl::StatusCode::kFailedPrecondition);
  }
}

}  // namespace
}  // namespace splitq::trainer
