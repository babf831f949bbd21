// `splitq bench cluster --config F [--set k=v ...] [--clients 1,4,8,16] [--steps S] ...`
// This file parses flags; the work is tools/cluster_bench.h.
#include <memory>

#include "cli/commands.h"
#include "tools/cluster_bench.h"

namespace splitq::cli {

void RegisterBenchCluster(CLI::App& bench, RunFn* run) {
  auto opt = std::make_shared<tools::ClusterBenchOptions>();
  CLI::App* cmd = bench.add_subcommand(
      "cluster",
      "A worker's aggregate samples/s with N clients: one step at a time, merged, one process");
  cmd->add_option("--config", opt->config_path, "The YAML run config")->required();
  cmd->add_option("--set", opt->overrides, "Override a key: key.path=value (YAML value)");
  cmd->add_option("--init", opt->init, "Base checkpoint (LoRA configs need one)");
  cmd->add_option("--clients", opt->clients, "Client counts, one row each")
      ->delimiter(',')
      ->check(IntRange(1, 256));
  cmd->add_option("--steps", opt->steps, "Measured steps per client")->check(IntRange(1, 1 << 20));
  cmd->add_option("--warmup", opt->warmup, "Unmeasured steps per client first")
      ->check(IntRange(0, 1 << 20));
  cmd->add_option("--merge", opt->merge, "Clients per merged batch (0: all the row's clients)")
      ->check(IntRange(0, 1024));
  cmd->add_option("--window-ms", opt->window_ms,
                  "Merge window in ms (default: the config's server.merge.window_ms)")
      ->check(CLI::Range(0.0, 1000.0));
  cmd->add_option("--merge-threads", opt->merge_threads,
                  "A merged run per value of server.merge.threads (0: auto; default: the "
                  "config's)")
      ->delimiter(',')
      ->check(IntRange(0, 256));
  cmd->add_option("--json", opt->json_path, "Also write the rows as JSON to this file");
  cmd->callback([opt, run] {
    *run = [opt] {
      WarnIfReferenceBlas();
      return tools::RunClusterBench(*opt);
    };
  });
}

}  // namespace splitq::cli
