// `splitq client --config F --coordinator HOST:PORT --id NAME [--token FILE] [--shard K/N]
// [--out DIR] (--tls-dir DIR [--mtls] | --insecure)`: one client of a cluster. It runs the
// client part of the model on its own shard of the data (trainer/client_part.h), gets a worker
// from the coordinator, and trains through it with the same driver as `splitq train`
// (progress, metrics.jsonl, validation.jsonl, checkpoint.pt, summary.json in --out).
//
// The run itself (registration, failover, heartbeats, resume) is client/client_session.h; this
// file parses flags, builds the client part and prints. SIGINT/SIGTERM stop at the end of the
// step with a checkpoint (exit 128 + signal); a second one exits at once. --metrics-listen
// serves the client's live numbers to Prometheus (splitq_client_*: steps, step latency, loss,
// bits in use, bytes up and down).
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "base/log.h"
#include "base/metrics.h"
#include "base/status_macros.h"
#include "cli/commands.h"
#include "cli/net_common.h"
#include "cli/security_flags.h"
#include "client/client_session.h"
#include "proto/protocol.h"
#include "server/metrics_server.h"
#include "trainer/client_part.h"
#include "trainer/config.h"
#include "trainer/train_loop.h"

namespace splitq::cli {
namespace {

std::atomic<bool> g_interrupt{false};
std::atomic<int> g_signal{0};
void OnInterrupt(int signal) {
  g_signal.store(signal);
  if (g_interrupt.exchange(true)) std::_Exit(128 + signal);
}

struct ClientCommandOptions {
  std::string config_path, coordinator, id, token_path, shard = "0/1", out_dir, init;
  std::string metrics_listen;  // HOST:PORT for Prometheus' /metrics ("": none)
  std::vector<std::string> overrides;
  rpc::TransportSecurity security;
  int connect_timeout_s = 120, reconnect_timeout_s = 300;
  int reply_timeout_s = 300;  // a step's answer not here after this long: reconnect (0: never)
  int micro_batches = 0;      // 0: the config's client.micro_batches
  int chunk_kib = 1024;       // activation frames go up in chunks of this size
};

int Fail(const std::string& id, const char* what, const absl::Status& status, int code = 2) {
  spdlog::error("client {}: {}: {}", id, what, status.ToString());
  return code;
}

absl::StatusOr<trainer::DataShard> ParseShard(const std::string& text) {
  const size_t slash = text.find('/');
  trainer::DataShard shard;
  if (slash == std::string::npos || !absl::SimpleAtoi(text.substr(0, slash), &shard.index) ||
      !absl::SimpleAtoi(text.substr(slash + 1), &shard.count) || shard.count < 1 ||
      shard.index < 0 || shard.index >= shard.count) {
    return absl::InvalidArgumentError(
        absl::StrCat("--shard '", text, "': expected K/N with 0 <= K < N"));
  }
  return shard;
}

int RunClient(const ClientCommandOptions& opt) {
  WarnIfReferenceBlas();
  if (absl::Status s = rpc::ValidateSecurity(opt.security); !s.ok()) {
    return Fail(opt.id, "flags", s);
  }
  if (!rpc::IsValidMemberName(opt.id)) {
    return Fail(opt.id, "--id", absl::InvalidArgumentError("1..64 of [A-Za-z0-9._-], not . or .."));
  }
  auto shard = ParseShard(opt.shard);
  if (!shard.ok()) return Fail(opt.id, "flags", shard.status());
  auto config = trainer::LoadRunConfig(opt.config_path, opt.overrides);
  if (!config.ok()) return Fail(opt.id, "config", config.status());
  auto digest = ConfigDigest(opt.config_path, opt.overrides);
  if (!digest.ok()) return Fail(opt.id, "config", digest.status());
  auto token = TokenFromFile(opt.token_path);
  if (!token.ok()) return Fail(opt.id, "--token", token.status());

  trainer::TrainOptions train_options;
  train_options.out_dir =
      opt.out_dir.empty() ? (std::filesystem::path("runs") / opt.id).string() : opt.out_dir;
  train_options.resume =
      std::filesystem::exists(std::filesystem::path(train_options.out_dir) / "checkpoint.pt");
  train_options.resume_hint = absl::StrCat(
      "run the same `splitq client` command again: it resumes from ", train_options.out_dir);
  auto run_id = client::RunId(train_options.out_dir);
  if (!run_id.ok()) return Fail(opt.id, "--out", run_id.status());
  auto part = trainer::ClientPart::Create(*config, opt.init, train_options.resume, *shard);
  if (!part.ok()) return Fail(opt.id, "client part", part.status(), 1);
  // The config's slices save host memory, which only a CPU client spends on activations; a
  // CUDA client runs the batch whole unless --micro-batches says otherwise.
  int micro_batches = 1;
  if (opt.micro_batches > 0) {
    micro_batches = opt.micro_batches;
  } else if ((*part)->device().rfind("cpu", 0) == 0) {
    micro_batches = static_cast<int>(config->client_micro_batches);
  }
  if (micro_batches > config->batch_size) {  // a slice holds one example at least
    spdlog::warn("client {}: {} slices of a batch of {}: using {}", opt.id, micro_batches,
                 config->batch_size, config->batch_size);
    micro_batches = static_cast<int>(config->batch_size);
  }
  (*part)->set_micro_batches(micro_batches);

  const bool tty = isatty(fileno(stderr)) != 0 && !base::LoggingAsJson();
  client::ClientSessionOptions session;
  session.id = opt.id;
  session.coordinator = opt.coordinator;
  session.security = opt.security;
  session.link.client_id = opt.id;
  session.link.token = *token;
  session.link.config_digest = *digest;
  session.link.run_id = *run_id;
  session.link.chunk_bytes = int64_t{opt.chunk_kib} << 10;
  session.link.reply_timeout = std::chrono::seconds(opt.reply_timeout_s);
  session.connect_timeout = std::chrono::seconds(opt.connect_timeout_s);
  session.reconnect_timeout = std::chrono::seconds(opt.reconnect_timeout_s);
  session.interrupt = &g_interrupt;
  session.log = [tty, &opt](const std::string& line) {
    spdlog::info("{}client {}: {}", tty ? "\n" : "", opt.id, line);
  };
  train_options.interrupt = &g_interrupt;
  SetProgressOutput(opt.id + ": ", &train_options);
  // Prometheus: the registry and its server live until the run ends (declared before the run,
  // destroyed after it; the server goes first).
  base::Registry registry;
  std::unique_ptr<server::MetricsServer> metrics_server;
  if (!opt.metrics_listen.empty()) {
    base::Metric* steps = registry.Counter("splitq_client_steps_total", "Training steps done");
    base::Histogram* latency = registry.Histo(
        "splitq_client_step_seconds", "Wall time of a training step (client, wire and server)",
        base::LatencyBuckets());
    base::Metric* loss = registry.Gauge("splitq_client_loss", "Training loss of the last step");
    base::Metric* act_bits = registry.Gauge("splitq_client_activation_bits",
                                            "Mean bits per element of the last activation frame");
    base::Metric* grad_bits = registry.Gauge("splitq_client_gradient_bits",
                                             "Mean bits per element of the last gradient frame");
    base::Metric* up =
        registry.Counter("splitq_client_bytes_up_total",
                         "Bytes of frames sent to workers over the run (kept across a resume)");
    base::Metric* down = registry.Counter(
        "splitq_client_bytes_down_total",
        "Bytes of frames received from workers over the run (kept across a resume)");
    base::Metric* fp32 = registry.Counter(
        "splitq_client_bytes_fp32_equivalent_total",
        "What the same tensors would have cost as float32, both ways, over the run");
    registry.Gauge("splitq_client_steps", "Steps of the run (the config's steps)")
        ->Set(static_cast<double>(config->steps));
    train_options.on_step = [=](int64_t /*step*/, const trainer::StepStats& s,
                                const trainer::WireTotals& wire) {
      steps->Add(1);  // the steps this process ran (a resumed run counts from its resume)
      latency->Observe(s.step_ms / 1000.0);
      loss->Set(s.loss);
      act_bits->Set(s.act_bits);
      grad_bits->Set(s.grad_bits);
      up->Set(static_cast<double>(wire.bytes_up));
      down->Set(static_cast<double>(wire.bytes_down));
      fp32->Set(static_cast<double>(wire.bytes_fp32_equivalent));
    };
    auto started = server::MetricsServer::Start(opt.metrics_listen, registry);
    if (!started.ok()) return Fail(opt.id, "--metrics-listen", started.status());
    metrics_server = std::move(*started);
    spdlog::info("client {}: metrics at http://{}/metrics", opt.id, metrics_server->address());
  }
  client::SessionEvents events;
  events.connected = [&](const std::string& worker) {
    spdlog::info(
        "client {}: shard {}, worker {}; client part on {} in {} slice(s) of the batch, RSS {:.0f} "
        "MiB",
        opt.id, opt.shard, worker, (*part)->device(), micro_batches, RssMiB());
  };
  std::signal(SIGINT, OnInterrupt);
  std::signal(SIGTERM, OnInterrupt);
  const absl::StatusOr<trainer::TrainSummary> summary =
      client::RunClientSession(**part, session, train_options, events);
  EndProgress();
  if (!summary.ok()) {
    spdlog::error("client {}: {}", opt.id, summary.status().ToString());
    return summary.status().code() == absl::StatusCode::kCancelled ? 128 + g_signal.load() : 1;
  }
  PrintTrainSummary(*summary, train_options.out_dir);
  std::printf("client %s: peak RSS %.0f MiB\n", opt.id.c_str(), PeakRssMiB());
  return 0;
}

}  // namespace

void RegisterClient(CLI::App& app, RunFn* run) {
  auto opt = std::make_shared<ClientCommandOptions>();
  CLI::App* cmd = app.add_subcommand("client", "Run a client: the client part, on its own data");
  cmd->add_option("--config", opt->config_path, "The YAML run config")->required();
  cmd->add_option("--set", opt->overrides, "Override a key: key.path=value (YAML value)");
  cmd->add_option("--coordinator", opt->coordinator, "The coordinator's HOST:PORT")->required();
  cmd->add_option("--id", opt->id, "This client's id (1..64 of [A-Za-z0-9._-], not . or ..)")
      ->required();
  cmd->add_option("--token", opt->token_path, "This client's bearer token file");
  cmd->add_option("--shard", opt->shard, "K/N: train on samples with id % N == K (default 0/1)");
  cmd->add_option("--out", opt->out_dir,
                  "Output directory (default runs/<id>); resumes from "
                  "its checkpoint.pt when there is one");
  cmd->add_option("--init", opt->init, "Base weights checkpoint (LoRA runs)");
  AddMetricsListen(*cmd, &opt->metrics_listen);
  cmd->add_option("--chunk-kib", opt->chunk_kib,
                  "Send activation frames in chunks of this many KiB (default 1024; 256 moved "
                  "frames of 1 MiB or more 1.2-1.8x faster in `splitq bench transport` on a "
                  "16-core host, not on 2 cores, and no end-to-end gain was measured: "
                  "docs/benchmarks.md)")
      ->check(IntRange(16, 4096));
  cmd->add_option("--micro-batches", opt->micro_batches,
                  "Run the client's layers on K slices of the batch, one at a time, and "
                  "recompute them in the backward pass: less memory, one more forward pass "
                  "(default: the config's client.micro_batches on a CPU, 1 on CUDA)")
      ->check(IntRange(1, 1024));
  AddSecurityFlags(cmd, &opt->security, /*serving=*/false);
  cmd->add_option("--connect-timeout", opt->connect_timeout_s,
                  "Seconds to keep trying to reach the coordinator and a worker at the start")
      ->check(IntRange(1, 1 << 30));
  cmd->add_option("--reply-timeout-s", opt->reply_timeout_s,
                  "Give up on a worker that has not answered a step (or a validation batch) this "
                  "many seconds after it was sent: reconnect, perhaps to another worker, and send "
                  "it again. 0: wait for ever. Default 300")
      ->check(IntRange(0, 1 << 20));
  cmd->add_option("--reconnect-timeout", opt->reconnect_timeout_s,
                  "Seconds to keep trying after the worker stream failed")
      ->check(IntRange(1, 1 << 30));
  cmd->callback([opt, run] { *run = [opt] { return RunClient(*opt); }; });
}

}  // namespace splitq::cli
