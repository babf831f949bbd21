// `splitq coordinator --config F --listen HOST:PORT (--tls-dir DIR [--mtls] | --insecure)
// [--tokens FILE] [--heartbeat-ms N] [--ready-file FILE]`: the control plane of a cluster
// (server/coordinator_service.h), with the standard gRPC health service. Listening on port 0
// picks a free port; the address is printed, and written to --ready-file (cli/net_common.h,
// ReadyFile). SIGINT or SIGTERM stops it cleanly.
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "cli/commands.h"
#include "cli/net_common.h"
#include "cli/security_flags.h"
#include "server/coordinator_service.h"
#include "server/rpc_channel.h"
#include "trainer/config.h"

namespace splitq::cli {
namespace {

std::atomic<bool> g_stop{false};
void OnStop(int) { g_stop.store(true); }

struct CoordinatorOptions {
  std::string config_path, listen = "127.0.0.1:0", tokens_path;
  server::TransportSecurity security;
  int heartbeat_ms = 1000;
  std::string ready_file;
};

int RunCoordinator(const CoordinatorOptions& opt) {
  auto config = trainer::LoadRunConfig(opt.config_path);
  if (!config.ok()) {
    std::fprintf(stderr, "config error: %s\n", std::string(config.status().message()).c_str());
    return 2;
  }
  std::ifstream file(opt.config_path);
  std::stringstream yaml;
  yaml << file.rdbuf();
  std::unique_ptr<server::TokenSet> tokens;
  if (!opt.tokens_path.empty()) {
    auto loaded = server::TokenSet::Load(opt.tokens_path);
    if (!loaded.ok()) {
      std::fprintf(stderr, "coordinator: %s\n", loaded.status().ToString().c_str());
      return 2;
    }
    tokens = std::make_unique<server::TokenSet>(std::move(*loaded));
  } else if (!opt.security.insecure) {
    std::fprintf(stderr,
                 "coordinator: --tokens FILE is required with TLS (make one with "
                 "`splitq tokens`)\n");
    return 2;
  }
  auto credentials = server::MakeServerCredentials(opt.security);
  if (!credentials.ok()) {
    std::fprintf(stderr, "coordinator: %s\n", credentials.status().ToString().c_str());
    return 2;
  }
  server::CoordinatorCore core(
      server::CoordinatorOptions{std::chrono::milliseconds(opt.heartbeat_ms),
                                 std::chrono::milliseconds(2 * opt.heartbeat_ms), 64});
  server::CoordinatorService service(core, tokens.get(), yaml.str());
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(opt.listen, *credentials, &port);
  // gRPC sets SO_REUSEPORT by default: a second process could then listen on our port.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    std::fprintf(stderr, "coordinator: cannot listen on %s\n", opt.listen.c_str());
    return 1;
  }
  // `splitq health --service splitq.v1.Coordinator` as well as the whole server.
  server->GetHealthCheckService()->SetServingStatus(splitq::v1::Coordinator::service_full_name(),
                                                    true);
  const std::string host = opt.listen.substr(0, opt.listen.rfind(':'));
  std::printf("coordinator listening on %s:%d (%s)\n", host.c_str(), port,
              opt.security.insecure ? "plaintext" : "TLS");
  std::fflush(stdout);
  // Before the ready file, so that a SIGTERM cannot end us with the file left behind.
  std::signal(SIGINT, OnStop);
  std::signal(SIGTERM, OnStop);
  ReadyFile ready(opt.ready_file);
  if (absl::Status s = ready.Announce(absl::StrCat(host, ":", port)); !s.ok()) {
    std::fprintf(stderr, "coordinator: --ready-file: %s\n", s.ToString().c_str());
    return 1;
  }
  while (!g_stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  std::printf("coordinator stopped\n");
  return 0;
}

}  // namespace

void RegisterCoordinator(CLI::App& app, RunFn* run) {
  auto opt = std::make_shared<CoordinatorOptions>();
  CLI::App* cmd = app.add_subcommand("coordinator", "Run a cluster's coordinator");
  cmd->add_option("--config", opt->config_path, "The YAML run config")->required();
  cmd->add_option("--listen", opt->listen, "HOST:PORT (port 0: pick a free one)");
  AddSecurityFlags(cmd, &opt->security, /*serving=*/true);
  cmd->add_option("--tokens", opt->tokens_path, "Bearer tokens from `splitq tokens`");
  cmd->add_option("--heartbeat-ms", opt->heartbeat_ms, "Heartbeat period (dead after two)")
      ->check(IntRange(10, 600000));
  cmd->add_option("--ready-file", opt->ready_file,
                  "Once listening, write HOST:PORT here (removed when it stops)");
  cmd->callback([opt, run] { *run = [opt] { return RunCoordinator(*opt); }; });
}

}  // namespace splitq::cli
