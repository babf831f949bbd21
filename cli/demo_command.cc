// `splitq demo [--config F] [--clients N] [--out DIR]`: a whole cluster on this machine, as
// This file parses flags; the work is tools/demo.h.
#include <memory>

#include "cli/commands.h"
#include "tools/demo.h"

namespace splitq::cli {

void RegisterDemo(CLI::App& app, RunFn* run) {
  auto opt = std::make_shared<tools::DemoOptions>();
  CLI::App* cmd = app.add_subcommand(
      "demo", "A cluster on this machine: coordinator, worker and clients as processes (TLS)");
  cmd->add_option("--config", opt->config_path, "The YAML run config (default: the embedded one)");
  cmd->add_option("--clients", opt->clients, "How many clients")->check(IntRange(1, 64));
  cmd->add_option("--workers", opt->workers,
                  "How many workers (more than 1: one replica group serving one model)")
      ->check(IntRange(1, 16));
  cmd->add_option("--out", opt->out_dir, "Output directory (default runs/demo)");
  cmd->add_option("--startup-timeout", opt->startup_timeout_s,
                  "Seconds a server may take to be ready (listening; a worker also registered)");
  cmd->callback([opt, run] {
    *run = [opt] {
      return tools::RunDemo(*opt,
                            [](const trainer::TrainSummary& all) { PrintTrainSummary(all, ""); });
    };
  });
}

}  // namespace splitq::cli
