// `splitq bench coordinator [--members N] [--workers W] [--seconds S] [--rate R] [--window K]
// [--channels C] [--generator-threads T] [--heartbeat-ms MS] [--forget-after-s S] [--churn-pool P]
// [--connections K]
// [--coordinator-cpus K] [--grpc-memory-mib M]
// [--no-expire]
// [--json FILE]`: the coordinator (a child process) under a load generator of our own
// (tools/coordinator_bench.h); a table on stdout, progress on stderr.
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "cli/commands.h"
#include "tools/coordinator_bench.h"

namespace splitq::cli {

void RegisterBenchCoordinator(CLI::App& bench, RunFn* run) {
  struct Options {
    tools::CoordinatorBenchOptions bench;
    bool no_expire = false;
    std::string json;
  };
  auto opt = std::make_shared<Options>();
  tools::CoordinatorBenchOptions& b = opt->bench;
  CLI::App* cmd = bench.add_subcommand(
      "coordinator",
      "The coordinator (a child process) under load: register, assign, heartbeat, status, "
      "churn, expiry; per-call server CPU and latency percentiles");
  cmd->add_option("--members", b.members, "Simulated members, workers included (default 100000)")
      ->check(IntRange(2, 10000000));
  cmd->add_option("--workers", b.workers, "Of which workers (default 256)")
      ->check(IntRange(1, 100000));
  cmd->add_option("--seconds", b.seconds, "Length of each timed phase (default 5)")
      ->check(IntRange(1, 3600));
  cmd->add_option("--rate", b.rate, "Calls/s of the paced phases (default 50000)")
      ->check(IntRange(1, 10000000));
  cmd->add_option("--window", b.window, "Calls in flight at most (default 512)")
      ->check(IntRange(1, 100000));
  cmd->add_option("--channels", b.channels, "HTTP/2 connections to the coordinator (default 8)")
      ->check(IntRange(1, 1024));
  cmd->add_option("--generator-threads", b.generator_threads,
                  "Threads issuing calls, each with its share of the window and rate (default 1)")
      ->check(IntRange(1, 256));
  cmd->add_option("--heartbeat-ms", b.heartbeat_ms,
                  "The coordinator's heartbeat period (dead after two; default 15000, so that "
                  "members live between the phases that speak for them)")
      ->check(IntRange(10, 600000));
  cmd->add_option("--forget-after-s", b.forget_after_s,
                  "The coordinator's --forget-after-s (default 2, so churn shows it)")
      ->check(IntRange(0, 86400));
  cmd->add_option("--churn-pool", b.churn_pool,
                  "Names that leave and register again in the churn phase (default 20000)")
      ->check(IntRange(1, 10000000));
  cmd->add_option("--connections", b.connections,
                  "Connections opened and closed in the connections phase (default 2000; 0 skips "
                  "it)")
      ->check(IntRange(0, 100000));
  cmd->add_option("--grpc-memory-mib", opt->bench.grpc_memory_mib,
                  "The coordinator's --grpc-memory-mib (default 0: none, as the coordinator's)")
      ->check(IntRange(0, 1 << 20));
  cmd->add_option("--coordinator-cpus", opt->bench.coordinator_cpus,
                  "Pin the coordinator to CPUs 0..K-1 and the generator to the others (no "
                  "competition for a core; default 0: no pinning)")
      ->check(IntRange(0, 4096));
  cmd->add_flag("--no-expire", opt->no_expire,
                "Skip the expiry phase (it waits four heartbeat periods and --forget-after-s)");
  cmd->add_option("--json", opt->json, "Also write the rows as JSON to this file");
  cmd->callback([opt, run] {
    *run = [opt] {
      std::ofstream out;
      if (!opt->json.empty()) {
        out.open(opt->json);
        if (!out) {
          std::fprintf(stderr, "bench coordinator: cannot write %s: %s\n", opt->json.c_str(),
                       std::strerror(errno));
          return 1;
        }
      }
      tools::CoordinatorBenchOptions o = opt->bench;
      o.expire = !opt->no_expire;
      if (o.workers >= o.members) {
        std::fprintf(stderr, "bench coordinator: --workers must be below --members\n");
        return 2;
      }
      o.progress = [](const std::string& line) {
        std::fprintf(stderr, "bench coordinator: %s\n", line.c_str());
      };
      std::printf(
          "coordinator: a child process on loopback, plaintext, tokens on; %d members (%d "
          "workers), generator: this process, %d thread(s), %d connections, %d calls in flight "
          "at most; %u cores%s\n",
          o.members, o.workers, o.generator_threads, o.channels, o.window,
          std::thread::hardware_concurrency(),
          o.coordinator_cpus > 0 ? absl::StrCat("; coordinator pinned to CPUs 0..",
                                                o.coordinator_cpus - 1, ", generator to the others")
                                       .c_str()
                                 : "");
      std::fflush(stdout);
      auto rows = tools::RunCoordinatorBench(o);
      if (!rows.ok()) {
        std::fprintf(stderr, "bench coordinator: %s\n", rows.status().ToString().c_str());
        return 1;
      }
      std::printf("%s", tools::FormatCoordinatorBench(*rows).c_str());
      if (!opt->json.empty()) {
        out << tools::CoordinatorBenchJson(*rows, o);
        out.close();
        if (!out) {
          std::fprintf(stderr, "bench coordinator: cannot write %s\n", opt->json.c_str());
          return 1;
        }
      }
      return 0;
    };
  });
}

}  // namespace splitq::cli
