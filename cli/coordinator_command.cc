// `splitq coordinator --config F --listen HOST:PORT (--tls-dir DIR [--mtls] | --insecure)
// [--tokens FILE] [--heartbeat-ms N] [--forget-after-s N] [--ready-file FILE]`: the control plane
// of a cluster (server/coordinator_process.h). Listening on port 0 picks a free port; the address
// is printed, and written to --ready-file (server/process.h, ReadyFile). SIGINT or SIGTERM stops it
// cleanly.

#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "cli/commands.h"
#include "cli/net_common.h"
#include "cli/security_flags.h"
#include "proto/rpc_channel.h"
#include "server/coordinator_process.h"
#include "trainer/config.h"

namespace splitq::cli {
namespace {

std::atomic<bool> g_stop{false};
void OnStop(int) { g_stop.store(true); }

struct CoordinatorOptions {
  std::string config_path, listen = "127.0.0.1:0", tokens_path;
  rpc::TransportSecurity security;
  int heartbeat_ms = 1000;
  int forget_after_s = 600;
  std::string ready_file, metrics_listen;
  server::ConnectionLimits connection_limits;
};

int RunCoordinator(const CoordinatorOptions& opt) {
  auto config = trainer::LoadRunConfig(opt.config_path);
  if (!config.ok()) {
    spdlog::error("config error: {}", std::string(config.status().message()));
    return 2;
  }
  server::CoordinatorProcessOptions o;
  std::ifstream file(opt.config_path);
  std::stringstream yaml;
  yaml << file.rdbuf();
  o.config_yaml = yaml.str();
  std::unique_ptr<server::TokenSet> tokens;
  if (!opt.tokens_path.empty()) {
    auto loaded = server::TokenSet::Load(opt.tokens_path);
    if (!loaded.ok()) {
      spdlog::error("coordinator: {}", loaded.status().ToString());
      return 2;
    }
    tokens = std::make_unique<server::TokenSet>(std::move(*loaded));
  } else if (!opt.security.insecure) {
    spdlog::error(
        "coordinator: --tokens FILE is required with TLS (make one with `splitq tokens`)");
    return 2;
  }
  o.tokens = tokens.get();
  o.listen = opt.listen;
  o.security = opt.security;
  o.heartbeat_period = std::chrono::milliseconds(opt.heartbeat_ms);
  o.forget_after = std::chrono::seconds(opt.forget_after_s);
  o.rebalance_groups = config->group_rebalance;
  o.connection_limits = opt.connection_limits;
  o.ready_file = opt.ready_file;
  o.metrics_listen = opt.metrics_listen;
  o.log = [](const std::string& line) { spdlog::info("{}", line); };
  auto coordinator = server::CoordinatorProcess::Start(o);
  if (!coordinator.ok()) {
    spdlog::error("coordinator: {}", coordinator.status().ToString());
    return coordinator.status().code() == absl::StatusCode::kUnavailable ? 1 : 2;
  }
  // Before the ready file, so that a SIGTERM cannot end us with the file left behind.
  std::signal(SIGINT, OnStop);
  std::signal(SIGTERM, OnStop);
  if (absl::Status s = (*coordinator)->Run(g_stop); !s.ok()) {
    spdlog::error("coordinator: {}", s.ToString());
    return 1;
  }
  return 0;
}

}  // namespace

void RegisterCoordinator(CLI::App& app, RunFn* run) {
  auto opt = std::make_shared<CoordinatorOptions>();
  CLI::App* cmd = app.add_subcommand("coordinator", "Run a cluster's coordinator");
  cmd->add_option("--config", opt->config_path, "The YAML run config")->required();
  cmd->add_option("--listen", opt->listen, "HOST:PORT (port 0: pick a free one)");
  AddSecurityFlags(cmd, &opt->security, /*serving=*/true);
  AddConnectionLimitFlags(cmd, &opt->connection_limits);
  cmd->add_option("--tokens", opt->tokens_path, "Bearer tokens from `splitq tokens`");
  cmd->add_option("--heartbeat-ms", opt->heartbeat_ms, "Heartbeat period (dead after two)")
      ->check(IntRange(10, 600000));
  cmd->add_option("--forget-after-s", opt->forget_after_s,
                  "Remove a dead or departed member's record (and a client's progress) this "
                  "many seconds after its death (default 600)")
      ->check(IntRange(0, 30 * 86400));
  cmd->add_option("--ready-file", opt->ready_file,
                  "Once listening, write HOST:PORT here (removed when it stops)");
  AddMetricsListen(*cmd, &opt->metrics_listen);
  cmd->callback([opt, run] { *run = [opt] { return RunCoordinator(*opt); }; });
}

}  // namespace splitq::cli
