// `splitq bench kernels`: our kernels, PyTorch's ops of the same shape and a plain copy
// This file parses flags; the work is tools/kernel_bench.h.
#include <memory>

#include "cli/commands.h"
#include "tools/kernel_bench.h"

namespace splitq::cli {

void RegisterBenchKernels(CLI::App& bench, RunFn* run) {
  auto opt = std::make_shared<tools::KernelBenchOptions>();
  CLI::App* cmd = bench.add_subcommand("kernels", "Our kernels vs PyTorch's ops and a copy");
  cmd->add_option("--device", opt->device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--json", opt->json_path, "Also write the results as JSON to this file");
  cmd->add_option("--filter", opt->filter,
                  "Only the cases whose name (OP:SHAPE:DTYPE[:bBITS]) contains this");
  cmd->add_option("--iters", opt->iters, "Timed calls per case (default 20 CUDA, 9 CPU)")
      ->check(IntRange(1, 1 << 30));
  cmd->callback([opt, run] { *run = [opt] { return tools::RunKernelBench(*opt); }; });
}

}  // namespace splitq::cli
