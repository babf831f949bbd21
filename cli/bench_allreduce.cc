// `splitq bench allreduce [--backend B] [--world N] [--mib M]... [--config F] ...`
// This file parses flags; the work is tools/allreduce_bench.h.
#include <memory>

#include "cli/commands.h"
#include "tools/allreduce_bench.h"

namespace splitq::cli {

void RegisterBenchAllreduce(CLI::App& bench, RunFn* run) {
  auto opt = std::make_shared<tools::AllreduceBenchOptions>();
  CLI::App* cmd = bench.add_subcommand(
      "allreduce", "A worker group's gradient sum: ms per sum and bus bandwidth, N members");
  cmd->add_option("--backend", opt->backend, "auto (nccl on CUDA, else gloo), gloo or nccl")
      ->check(CLI::IsMember({"auto", "gloo", "nccl"}));
  cmd->add_option("--world", opt->world, "Members (one thread each; on CUDA one GPU each)")
      ->check(IntRange(1, 64));
  cmd->add_option("--mib", opt->mib, "Buffer sizes in MiB, one row each (default 1,16,64)")
      ->delimiter(',')
      ->check(CLI::Range(0.001, 4096.0));
  cmd->add_option("--config", opt->config_path,
                  "Also a row of this config's server part's trainable weights");
  cmd->add_option("--set", opt->overrides, "Override a key of --config: key.path=value");
  cmd->add_option("--iters", opt->iters, "Timed sums per size")->check(IntRange(1, 1 << 20));
  cmd->add_option("--json", opt->json_path, "Also write the rows as JSON to this file");
  cmd->add_option("--rounds", opt->rounds,
                  "Time K whole group rounds of --config's server part per --bucket-kib "
                  "instead of bare sums")
      ->check(IntRange(1, 1 << 20));
  cmd->add_option("--bucket-kib", opt->bucket_kib,
                  "server.group.bucket_kib values compared by --rounds (default 0,1024)")
      ->delimiter(',')
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 20));
  cmd->add_option("--round-batch", opt->round_batch,
                  "Examples per member per round (default: the config's batch_size)")
      ->check(IntRange(1, 1 << 20));
  cmd->callback([opt, run] { *run = [opt] { return tools::RunAllreduceBench(*opt); }; });
}

}  // namespace splitq::cli
