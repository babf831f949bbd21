// `splitq bench step --config F [--set k=v ...] [--init CKPT] [--steps N] [--warmup W]
// This file parses flags; the work is tools/step_bench.h.
#include <memory>

#include "cli/commands.h"
#include "tools/coding_bench.h"
#include "tools/step_bench.h"

namespace splitq::cli {

void RegisterBenchStep(CLI::App& bench, RunFn* run) {
  auto opt = std::make_shared<tools::StepBenchOptions>();
  CLI::App* cmd = bench.add_subcommand(
      "step", "A config's training step against the same step with an fp32 wire, side by side");
  cmd->add_option("--config", opt->config_path, "The YAML run config")->required();
  cmd->add_option("--set", opt->overrides, "Override a key: key.path=value (YAML value)");
  cmd->add_option("--init", opt->init, "Base checkpoint (LoRA configs need one)");
  cmd->add_option("--steps", opt->steps, "Measured steps per run")->check(IntRange(1, 1 << 30));
  cmd->add_option("--warmup", opt->warmup, "Unmeasured steps first")->check(IntRange(0, 1 << 30));
  cmd->add_option("--json", opt->json_path, "Also write the results as JSON to this file");
  cmd->callback([opt, run] {
    *run = [opt] {
      WarnIfReferenceBlas();
      return tools::RunStepBench(*opt);
    };
  });
}

// `splitq bench coding`: tools/coding_bench.h.
void RegisterBenchCoding(CLI::App& bench, RunFn* run) {
  auto opt = std::make_shared<tools::CodingBenchOptions>();
  CLI::App* cmd = bench.add_subcommand(
      "coding", "Entropy coding of a run's frames: sizes against the codes' entropy, speed");
  cmd->add_option("--config", opt->config_path, "The YAML run config")->required();
  cmd->add_option("--set", opt->overrides, "Override a key: key.path=value (YAML value)");
  cmd->add_option("--init", opt->init, "Base checkpoint (LoRA configs need one)");
  cmd->add_option("--steps", opt->steps, "Training steps before the frames are measured")
      ->check(IntRange(1, 1 << 30));
  cmd->add_option("--frames", opt->frames, "The last steps whose frames are measured")
      ->check(IntRange(1, 10000));
  cmd->add_option("--iters", opt->iters, "Timed calls per frame (median)")
      ->check(IntRange(1, 1000));
  cmd->add_option("--dump", opt->dump_dir,
                  "Also write the frames' packed payloads and codes to this folder");
  cmd->callback([opt, run] { *run = [opt] { return tools::RunCodingBench(*opt); }; });
}

}  // namespace splitq::cli
