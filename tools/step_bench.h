// `splitq bench step --config F [--set k=v ...] [--init CKPT] [--steps N] [--warmup W]
// [--json FILE]`: the training step of a config against the same config with an fp32 wire
// (activations and gradients as raw floats), side by side in one process: the two runs
// alternate step by step, so both see the same machine state. Prints the median step time
// of each, the ratio, and the extra time per step of the quantized wire as a fraction of the
// fp32 step (issue 3's targets: at most 15% on the CPU for AMAQ, at most 1.1x on an H100 for
// the language model). Also prints what the client part holds in memory.
// splitq tools: `splitq bench step` (below).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace splitq::tools {

struct StepBenchOptions {
  std::string config_path;
  std::vector<std::string> overrides;
  std::string init;
  int steps = 40;
  int warmup = 5;
  std::string json_path;
};

// Runs it; returns the process exit code (errors are logged).
int RunStepBench(const StepBenchOptions& options);

}  // namespace splitq::tools
