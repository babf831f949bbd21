// `splitq throttle --listen HOST:PORT --to (HOST:PORT | -) [--mbit R]`: a TCP proxy that carries
// each direction at most R Mbit/s, for link benchmarks without `tc` (scripts/link-bench.sh).
// This file parses flags; the proxy is tools/throttle.h.
#include <atomic>
#include <csignal>
#include <memory>

#include "cli/commands.h"
#include "tools/throttle.h"

namespace splitq::cli {
namespace {

std::atomic<bool> g_stop{false};
void OnStop(int) { g_stop.store(true); }

}  // namespace

void RegisterThrottle(CLI::App& app, RunFn* run) {
  auto opt = std::make_shared<tools::ThrottleOptions>();
  CLI::App* cmd = app.add_subcommand(
      "throttle", "A TCP proxy capped at --mbit each way (link benchmarks without tc)");
  cmd->add_option("--listen", opt->listen, "IPv4 HOST:PORT (port 0: pick a free one)");
  cmd->add_option("--to", opt->to,
                  "HOST:PORT to forward to; '-': read it from stdin after listening")
      ->required();
  cmd->add_option("--mbit", opt->mbit, "Link rate in Mbit/s, each direction (default 100)");
  cmd->callback([opt, run] {
    *run = [opt] {
      return tools::RunThrottle(*opt, g_stop, [] {
        std::signal(SIGINT, OnStop);
        std::signal(SIGTERM, OnStop);
      });
    };
  });
}

}  // namespace splitq::cli
