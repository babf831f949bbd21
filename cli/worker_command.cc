// `splitq worker --config F --coordinator HOST:PORT --listen HOST:PORT [--name NAME]
// [--advertise HOST] (--tls-dir DIR [--mtls] | --insecure) [--tokens FILE] [--token FILE]
// [--out DIR [--checkpoint-every N]] [--chunk-kib K] [--ready-file FILE]`:
// the server part of the model behind the Worker service (server/worker_service.h), with the
// standard health service. It registers with the coordinator (retrying with backoff until
// --connect-timeout), heartbeats with its steps served, prints its address (and writes it to
// --ready-file: cli/net_common.h, ReadyFile once it is registered) and a status line
// every 10 s, and stops cleanly on SIGINT/SIGTERM (leaving the coordinator).
//
// With --out DIR the worker keeps DIR/worker.pt (the server part's weights and optimizer, and
// per client the first step it has not applied), replaced atomically once --checkpoint-every
// server updates (default: the config's checkpoint_every) have passed since the last save
// (looked at every 0.1 s, so a fast worker saves a few updates later) and when it stops. A worker
// started on a DIR that holds one resumes from it, so a restarted worker (a crash, a container
// restart policy) keeps its training; steps applied after the last checkpoint are lost, and the log
// names them when their client comes back.
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/files.h"
#include "cli/commands.h"
#include "cli/net_common.h"
#include "cli/security_flags.h"
#include "server/coordinator_client.h"
#include "server/worker_core.h"
#include "server/worker_service.h"
#include "trainer/config.h"
#include "trainer/server_part.h"

namespace splitq::cli {
namespace {

std::atomic<bool> g_stop{false};
void OnStop(int) { g_stop.store(true); }

struct WorkerCommandOptions {
  std::string config_path, coordinator, listen = "127.0.0.1:0", name = "worker0", advertise;
  std::vector<std::string> overrides;
  std::string init, tokens_path, token_path, out_dir;
  int64_t checkpoint_every = -1;  // server updates; -1: the config's checkpoint_every
  int chunk_kib = 1024;           // gradient frames go down in chunks of this size
  server::TransportSecurity security;
  uint32_t max_clients = 64;
  uint32_t advertise_port = 0;
  int connect_timeout_s = 120;
  std::string ready_file;
};

int Fail(const char* what, const absl::Status& status, int code = 2) {
  std::fprintf(stderr, "worker: %s: %s\n", what, status.ToString().c_str());
  return code;
}

int RunWorker(const WorkerCommandOptions& opt) {
  WarnIfReferenceBlas();
  if (absl::Status s = server::ValidateSecurity(opt.security); !s.ok()) return Fail("flags", s);
  auto config = trainer::LoadRunConfig(opt.config_path, opt.overrides);
  if (!config.ok()) return Fail("config", config.status());
  auto digest = ConfigDigest(opt.config_path, opt.overrides);
  if (!digest.ok()) return Fail("config", digest.status());
  auto own_token = TokenFromFile(opt.token_path);
  if (!own_token.ok()) return Fail("--token", own_token.status());
  std::unique_ptr<server::TokenSet> tokens;
  if (!opt.tokens_path.empty()) {
    auto loaded = server::TokenSet::Load(opt.tokens_path);
    if (!loaded.ok()) return Fail("--tokens", loaded.status());
    tokens = std::make_unique<server::TokenSet>(std::move(*loaded));
  } else if (!opt.security.insecure) {
    return Fail("--tokens", absl::InvalidArgumentError(
                                "required with TLS: the clients' tokens (`splitq tokens`)"));
  }
  auto part = trainer::ServerPart::Create(*config, opt.init);
  if (!part.ok()) return Fail("server part", part.status(), 1);

  server::WorkerOptions core_options;
  core_options.max_sessions = opt.max_clients;
  core_options.config_digest = *digest;
  server::WorkerCore core(**part, core_options);
  std::string checkpoint;
  if (!opt.out_dir.empty()) {
    std::error_code error;
    std::filesystem::create_directories(opt.out_dir, error);
    if (error) {
      return Fail("--out", absl::InternalError(opt.out_dir + ": " + error.message()));
    }
    checkpoint = (std::filesystem::path(opt.out_dir) / "worker.pt").string();
    if (absl::Status s =
            base::WriteFileAtomically(std::filesystem::path(opt.out_dir) / ".write-test", "", 0600);
        !s.ok()) {
      return Fail("--out", absl::FailedPreconditionError(
                               absl::StrCat(opt.out_dir, " is not writable: ", s.message())));
    }
    std::filesystem::remove(std::filesystem::path(opt.out_dir) / ".write-test", error);
    if (std::filesystem::exists(checkpoint)) {
      auto clients = core.LoadCheckpoint(checkpoint);
      if (!clients.ok()) return Fail("--out", clients.status());
      std::printf("worker %s resumed from %s: %lld server updates, progress of %zu clients\n",
                  opt.name.c_str(), checkpoint.c_str(),
                  static_cast<long long>(core.stats().updates), *clients);
      std::fflush(stdout);
    }
  }
  const int64_t checkpoint_every =
      opt.checkpoint_every >= 0 ? opt.checkpoint_every : config->checkpoint_every;
  int64_t saved_updates = core.stats().updates;
  // On failure the next attempt waits another checkpoint_every updates (a full disk must not
  // stall training with a save every 100 ms); a failed final save makes the exit code 1.
  auto save = [&](bool final) -> bool {
    const int64_t before = core.stats().updates;
    const auto start = std::chrono::steady_clock::now();
    auto updates = core.SaveCheckpoint(checkpoint);
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    if (!updates.ok()) {
      std::fprintf(stderr, "worker: checkpoint at %lld server updates failed: %s\n",
                   static_cast<long long>(before), updates.status().ToString().c_str());
      saved_updates = before;
      return false;
    }
    saved_updates = *updates;
    if (final) {
      std::error_code size_error;
      const auto bytes = std::filesystem::file_size(checkpoint, size_error);
      std::printf("worker %s saved %s at %lld server updates (%.1f MiB in %.0f ms)\n",
                  opt.name.c_str(), checkpoint.c_str(), static_cast<long long>(*updates),
                  size_error ? 0.0 : static_cast<double>(bytes) / (1 << 20), ms);
      std::fflush(stdout);
    }
    return true;
  };
  server::WorkerServiceOptions service_options;
  service_options.reply_chunk_bytes = int64_t{opt.chunk_kib} << 10;
  service_options.log = [name = opt.name](const std::string& line) {
    std::printf("worker %s: %s\n", name.c_str(), line.c_str());
    std::fflush(stdout);
  };
  server::WorkerService service(core, tokens.get(), service_options);

  auto credentials = server::MakeServerCredentials(opt.security);
  if (!credentials.ok()) return Fail("TLS", credentials.status());
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(opt.listen, *credentials, &port);
  // gRPC sets SO_REUSEPORT by default: a second process could then listen on our port.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.RegisterService(&service);
  builder.SetMaxReceiveMessageSize(server::MaxMessageBytes(core_options.assembler));
  // Keepalive: a client that vanished without closing its connection is noticed within ~20 s;
  // clients may ping every 5 s (server/worker_client.h pings every 10 s).
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 5000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  std::unique_ptr<grpc::Server> grpc_server = builder.BuildAndStart();
  if (grpc_server == nullptr || port == 0) {
    return Fail("listen", absl::UnavailableError("cannot listen on " + opt.listen), 1);
  }
  // `splitq health --service splitq.v1.Worker` as well as the whole server.
  grpc_server->GetHealthCheckService()->SetServingStatus(splitq::v1::Worker::service_full_name(),
                                                         true);
  auto listen = ParseHostPort(opt.listen);
  if (!listen.ok()) return Fail("--listen", listen.status());
  server::WorkerAddress advertised{
      opt.advertise.empty() ? listen->host : opt.advertise,
      opt.advertise_port != 0 ? opt.advertise_port : static_cast<uint32_t>(port)};
  if (advertised.host == "0.0.0.0" || advertised.host == "::" || advertised.host.empty()) {
    char host[256] = {};
    gethostname(host, sizeof host - 1);
    advertised.host = host;
  }
  std::printf("worker %s listening on %s (%s), server part on %s\n", opt.name.c_str(),
              JoinHostPort(advertised).c_str(), opt.security.insecure ? "plaintext" : "TLS",
              (*part)->device().c_str());
  if (advertised.port != static_cast<uint32_t>(port)) {  // --advertise-port: a proxy in front
    std::printf("worker %s bound to %s:%d\n", opt.name.c_str(), listen->host.c_str(), port);
  }
  std::fflush(stdout);
  std::signal(SIGINT, OnStop);
  std::signal(SIGTERM, OnStop);

  // The coordinator: register (it may start after us), then heartbeat.
  auto channel = MakeChannel(opt.coordinator, opt.security);
  if (!channel.ok()) return Fail("--coordinator", channel.status());
  server::CoordinatorClient coordinator(*channel, *own_token);
  server::Registration registration;
  auto register_once = [&]() -> absl::Status {
    if (g_stop.load()) return absl::CancelledError("stopped");
    auto r = coordinator.Register(server::Role::kWorker, opt.name, advertised, opt.max_clients);
    if (r.status().code() == absl::StatusCode::kAlreadyExists) {
      // Our previous run (a restart) until the coordinator marks it dead (its heartbeat
      // deadline), or another live worker with this name, which --connect-timeout ends.
      return absl::UnavailableError(absl::StrCat(
          r.status().message(), " (our previous run, or another worker with this name)"));
    }
    if (!r.ok()) return r.status();
    registration = *r;
    return absl::OkStatus();
  };
  const absl::Status registered = server::RetryWithBackoff(
      register_once, [](const absl::Status& s) { return server::IsTransient(s) && !g_stop.load(); },
      std::chrono::seconds(opt.connect_timeout_s),
      [&](const absl::Status& s, auto wait) {
        std::fprintf(stderr, "worker: coordinator %s: %s; retrying in %lld ms\n",
                     opt.coordinator.c_str(), std::string(s.message()).c_str(),
                     static_cast<long long>(wait.count()));
      });
  if (!registered.ok()) {
    grpc_server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    if (g_stop.load()) return 0;  // SIGINT/SIGTERM while registering: a clean stop
    return Fail("register", registered, 1);
  }
  std::printf("worker %s registered with the coordinator at %s\n", opt.name.c_str(),
              opt.coordinator.c_str());
  std::fflush(stdout);
  ReadyFile ready(opt.ready_file);  // listening and registered: clients can be sent here
  if (absl::Status s = ready.Announce(JoinHostPort(advertised)); !s.ok()) {
    (void)coordinator.Leave(registration.member_id);  // no client is sent to a worker that quit
    grpc_server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    return Fail("--ready-file", s, 1);
  }
  std::atomic<uint64_t> member_id{registration.member_id};  // the last registration's
  {
    server::Heartbeater heartbeat(
        coordinator, registration.member_id, registration.heartbeat_period,
        [&core] {
          const server::WorkerStats s = core.stats();
          return server::Heartbeater::Progress{static_cast<uint64_t>(s.steps_served),
                                               s.train_sessions};
        },
        [&]() -> absl::StatusOr<uint64_t> {
          auto r =
              coordinator.Register(server::Role::kWorker, opt.name, advertised, opt.max_clients);
          if (!r.ok()) return r.status();
          std::printf("worker %s registered again with the coordinator (it had lost us)\n",
                      opt.name.c_str());
          std::fflush(stdout);
          member_id.store(r->member_id);
          return r->member_id;
        },
        [&opt](const std::string& line) {
          std::printf("worker %s: %s\n", opt.name.c_str(), line.c_str());
          std::fflush(stdout);
        });
    auto last_status = std::chrono::steady_clock::now();
    while (!g_stop.load()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      if (!checkpoint.empty() && checkpoint_every > 0 &&
          core.stats().updates - saved_updates >= checkpoint_every) {
        (void)save(false);
      }
      if (std::chrono::steady_clock::now() - last_status > std::chrono::seconds(10)) {
        last_status = std::chrono::steady_clock::now();
        const server::WorkerStats s = core.stats();
        std::printf(
            "worker %s: %u sessions (train and evaluate), %lld steps served, %lld server updates\n",
            opt.name.c_str(), s.sessions, static_cast<long long>(s.steps_served),
            static_cast<long long>(s.updates));
        std::fflush(stdout);
      }
    }
  }
  // After the heartbeat thread has stopped, so that no beat re-registers us after the goodbye.
  (void)coordinator.Leave(member_id.load());
  grpc_server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  const bool saved = checkpoint.empty() || save(true);
  const server::WorkerStats s = core.stats();
  std::printf("worker %s stopped: %lld steps served, %lld server updates; peak RSS %.0f MiB\n",
              opt.name.c_str(), static_cast<long long>(s.steps_served),
              static_cast<long long>(s.updates), PeakRssMiB());
  return saved ? 0 : 1;
}

}  // namespace

void RegisterWorker(CLI::App& app, RunFn* run) {
  auto opt = std::make_shared<WorkerCommandOptions>();
  CLI::App* cmd = app.add_subcommand("worker", "Run a worker: the server part of the model");
  cmd->add_option("--config", opt->config_path, "The YAML run config")->required();
  cmd->add_option("--set", opt->overrides, "Override a key: key.path=value (YAML value)");
  cmd->add_option("--coordinator", opt->coordinator, "The coordinator's HOST:PORT")->required();
  cmd->add_option("--listen", opt->listen, "HOST:PORT (port 0: pick a free one)");
  cmd->add_option("--name", opt->name, "This worker's name (1..64 of [A-Za-z0-9._-])");
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
  cmd->add_option("--tokens", opt->tokens_path, "The clients' bearer tokens (`splitq tokens`)");
  cmd->add_option("--token", opt->token_path, "This worker's own token file, for the coordinator");
  cmd->add_option("--chunk-kib", opt->chunk_kib,
                  "Send gradient frames in chunks of this many KiB (default 1024; see "
                  "`splitq client --chunk-kib`)")
      ->check(IntRange(16, 4096));
  cmd->add_option("--ready-file", opt->ready_file,
                  "Once listening and registered, write the advertised HOST:PORT here (removed "
                  "when it stops)");
  cmd->add_option("--max-clients", opt->max_clients, "Clients served at once")
      ->check(IntRange(1, 4096));
  cmd->add_option("--connect-timeout", opt->connect_timeout_s,
                  "Seconds to keep trying to reach the coordinator")
      ->check(IntRange(1, 1 << 30));
  cmd->callback([opt, run] { *run = [opt] { return RunWorker(*opt); }; });
}

}  // namespace splitq::cli
