// `splitq worker --config F --coordinator HOST:PORT --listen HOST:PORT [--name NAME]
// [--advertise HOST] (--tls-dir DIR [--mtls] | --insecure) [--tokens FILE] [--token FILE]
// [--out DIR [--checkpoint-every N]] [--chunk-kib K] [--ready-file FILE]
// [--group-size N [--group-address A] [--group-timeout S]]`: one worker
// (server/worker_process.h: serving, registration, heartbeats, checkpoints). This file parses
// flags, loads the config and tokens, and runs it until SIGINT/SIGTERM.

#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "cli/commands.h"
#include "cli/net_common.h"
#include "cli/security_flags.h"
#include "proto/protocol.h"
#include "server/worker_process.h"
#include "trainer/config.h"

namespace splitq::cli {
namespace {

std::atomic<bool> g_stop{false};
void OnStop(int) { g_stop.store(true); }

struct WorkerCommandOptions {
  std::string config_path, coordinator, listen = "127.0.0.1:0", name = "worker0", advertise;
  std::vector<std::string> overrides;
  std::string init, tokens_path, token_path, out_dir, metrics_listen;
  int64_t checkpoint_every = -1;  // server updates; -1: the config's checkpoint_every
  int chunk_kib = 1024;           // gradient frames go down in chunks of this size
  int session_idle_s = 300;       // sessions waiting this long for a message end (0: never)
  int turn_idle_s = 30;           // U-shaped: a session holding the turn this long ends (0: never)
  rpc::TransportSecurity security;
  uint32_t max_clients = 64;
  uint32_t advertise_port = 0;
  int connect_timeout_s = 120;
  std::string ready_file;
  int group_size = 0;
  std::string group_address = "127.0.0.1";
  int group_timeout_s = 60;
  server::ConnectionLimits connection_limits;
};

int Fail(const char* what, const absl::Status& status, int code = 2) {
  spdlog::error("worker: {}: {}", what, status.ToString());
  return code;
}

int RunWorker(const WorkerCommandOptions& opt) {
  WarnIfReferenceBlas();
  if (absl::Status s = rpc::ValidateSecurity(opt.security); !s.ok()) return Fail("flags", s);
  if (!rpc::IsValidMemberName(opt.name)) {  // before it listens, not at Register
    return Fail("--name", absl::InvalidArgumentError(absl::StrCat(
                              "'", opt.name, "': 1..64 of [A-Za-z0-9._-], not . or ..")));
  }
  server::WorkerProcessOptions o;
  auto config = trainer::LoadRunConfig(opt.config_path, opt.overrides);
  if (!config.ok()) return Fail("config", config.status());
  o.config = *config;
  auto digest = ConfigDigest(opt.config_path, opt.overrides);
  if (!digest.ok()) return Fail("config", digest.status());
  o.config_digest = *digest;
  auto own_token = TokenFromFile(opt.token_path);
  if (!own_token.ok()) return Fail("--token", own_token.status());
  o.own_token = *own_token;
  std::unique_ptr<server::TokenSet> tokens;
  if (!opt.tokens_path.empty()) {
    auto loaded = server::TokenSet::Load(opt.tokens_path);
    if (!loaded.ok()) return Fail("--tokens", loaded.status());
    tokens = std::make_unique<server::TokenSet>(std::move(*loaded));
  } else if (!opt.security.insecure) {
    return Fail("--tokens", absl::InvalidArgumentError(
                                "required with TLS: the clients' tokens (`splitq tokens`)"));
  }
  o.tokens = tokens.get();
  o.init = opt.init;
  o.name = opt.name;
  o.coordinator = opt.coordinator;
  o.listen = opt.listen;
  o.advertise = opt.advertise;
  o.advertise_port = opt.advertise_port;
  o.security = opt.security;
  o.connection_limits = opt.connection_limits;
  o.out_dir = opt.out_dir;
  o.checkpoint_every = opt.checkpoint_every >= 0 ? opt.checkpoint_every : config->checkpoint_every;
  o.reply_chunk_bytes = int64_t{opt.chunk_kib} << 10;
  o.session_idle_ms = int64_t{opt.session_idle_s} * 1000;
  o.turn_idle_ms = int64_t{opt.turn_idle_s} * 1000;
  o.max_clients = opt.max_clients;
  o.connect_timeout = std::chrono::seconds(opt.connect_timeout_s);
  o.ready_file = opt.ready_file;
  o.group_size = opt.group_size;
  o.group_address = opt.group_address;
  o.group_timeout = std::chrono::seconds(opt.group_timeout_s);
  o.metrics_listen = opt.metrics_listen;
  o.log = [](const std::string& line) { spdlog::info("{}", line); };
  o.warn = [](const std::string& line) { spdlog::warn("worker: {}", line); };
  auto worker = server::WorkerProcess::Start(o);
  if (!worker.ok()) {
    // Exit 2: the flags or the --out folder (a checkpoint of another run) are wrong; 1: the
    // worker could not start (data, device, address).
    const absl::Status& e = worker.status();
    const bool flags =
        e.code() == absl::StatusCode::kInvalidArgument || absl::StartsWith(e.message(), "--out");
    return Fail("start", e, flags ? 2 : 1);
  }
  std::signal(SIGINT, OnStop);
  std::signal(SIGTERM, OnStop);
  if (absl::Status s = (*worker)->Run(g_stop); !s.ok()) return Fail("run", s, 1);
  return 0;
}

}  // namespace

void RegisterWorker(CLI::App& app, RunFn* run) {
  auto opt = std::make_shared<WorkerCommandOptions>();
  CLI::App* cmd = app.add_subcommand("worker", "Run a worker: the server part of the model");
  cmd->add_option("--config", opt->config_path, "The YAML run config")->required();
  cmd->add_option("--set", opt->overrides, "Override a key: key.path=value (YAML value)");
  cmd->add_option("--coordinator", opt->coordinator, "The coordinator's HOST:PORT")->required();
  cmd->add_option("--listen", opt->listen, "HOST:PORT (port 0: pick a free one)");
  cmd->add_option("--name", opt->name, "This worker's name (1..64 of [A-Za-z0-9._-], not . or ..)");
  cmd->add_option("--advertise", opt->advertise,
                  "Host clients dial (default: the --listen host, or this host's name)");
  cmd->add_option("--advertise-port", opt->advertise_port,
                  "Port clients dial, when not the listening one (a proxy or NAT in between)")
      ->check(IntRange(1, 65535));
  cmd->add_option("--init", opt->init, "Base weights checkpoint (LoRA runs)");
  cmd->add_option("--out", opt->out_dir,
                  "Keep DIR/worker.pt (the server part's state) and resume from it when present");
  cmd->add_option("--checkpoint-every", opt->checkpoint_every,
                  "Server updates between checkpoints in --out (default: the config's "
                  "checkpoint_every; 0: only when stopping)")
      ->check(IntRange(int64_t{0}, int64_t{1} << 40));
  AddSecurityFlags(cmd, &opt->security, /*serving=*/true);
  AddConnectionLimitFlags(cmd, &opt->connection_limits);
  cmd->add_option("--tokens", opt->tokens_path, "The clients' bearer tokens (`splitq tokens`)");
  cmd->add_option("--token", opt->token_path, "This worker's own token file, for the coordinator");
  cmd->add_option("--chunk-kib", opt->chunk_kib,
                  "Send gradient frames in chunks of this many KiB (default 1024; see "
                  "`splitq client --chunk-kib`)")
      ->check(IntRange(16, 4096));
  cmd->add_option("--session-idle-s", opt->session_idle_s,
                  "End a session that has waited this many seconds for the client's next message "
                  "(the client reconnects and resumes; it bounds how long an unfinished message "
                  "holds memory). 0: never. Default 300")
      ->check(IntRange(0, 1 << 30));
  cmd->add_option("--turn-idle-s", opt->turn_idle_s,
                  "U-shaped models: end a session whose step holds the server part (every other "
                  "client waits meanwhile) once it has waited this many seconds for the head "
                  "gradient; its step is abandoned and the client resumes. 0: only "
                  "--session-idle-s. Default 30")
      ->check(IntRange(0, 1 << 30));
  cmd->add_option("--ready-file", opt->ready_file,
                  "Once listening and registered, write the advertised HOST:PORT here (removed "
                  "when it stops)");
  cmd->add_option("--max-clients", opt->max_clients, "Clients served at once")
      ->check(IntRange(1, 4096));
  cmd->add_option("--connect-timeout", opt->connect_timeout_s,
                  "Seconds to keep trying to reach the coordinator")
      ->check(IntRange(1, 1 << 30));
  cmd->add_option("--group-size", opt->group_size,
                  "Join the run's worker group (one model served by many workers; "
                  "docs/cluster.md) and wait for N members before the first round (0: no group)")
      ->check(IntRange(0, 1024));
  cmd->add_option("--group-address", opt->group_address,
                  "The address the other members reach this one at (default 127.0.0.1)");
  cmd->add_option("--group-timeout", opt->group_timeout_s,
                  "Seconds to wait for --group-size members at the start, and the limit of "
                  "each collective")
      ->check(IntRange(1, 3600));
  AddMetricsListen(*cmd, &opt->metrics_listen);
  cmd->callback([opt, run] { *run = [opt] { return RunWorker(*opt); }; });
}

}  // namespace splitq::cli
