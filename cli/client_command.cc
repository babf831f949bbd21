// `splitq client --config F --coordinator HOST:PORT --id NAME [--token FILE] [--shard K/N]
// [--out DIR] (--tls-dir DIR [--mtls] | --insecure)`: one client of a cluster. It runs the
// client part of the model on its own shard of the data (trainer/client_part.h), gets a worker
// from the coordinator, and trains through it with the same driver as `splitq train`
// (progress, metrics.jsonl, validation.jsonl, checkpoint.pt, summary.json in --out).
//
// Faults: when the worker stream breaks (the worker died or the network failed) the client asks
// the coordinator for a worker again and reconnects, with exponential backoff (0.2 s doubling
// to 5 s, jittered) for up to --reconnect-timeout seconds; the step in flight is sent again,
// not recomputed. A client started on an --out that holds a checkpoint resumes from it (after a
// crash or a SIGKILL); the worker does not apply the replayed steps to its weights twice.
// SIGINT/SIGTERM stop at the end of the step with a checkpoint (exit 128 + signal).
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "base/files.h"
#include "base/status_macros.h"
#include "cli/commands.h"
#include "cli/net_common.h"
#include "cli/security_flags.h"
#include "server/coordinator_client.h"
#include "server/coordinator_core.h"  // IsValidMemberName
#include "server/tokens.h"
#include "server/worker_client.h"
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

// This run's id, kept in DIR/run_id from its first start on: the same across restarts on
// DIR (the worker then takes replayed steps as replays), new for a new DIR (the worker then
// applies every step, even under a client id it knows from an earlier run).
absl::StatusOr<std::string> RunId(const std::string& dir) {
  const std::filesystem::path path = std::filesystem::path(dir) / "run_id";
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) return absl::InternalError(absl::StrCat(dir, ": ", error.message()));
  if (std::filesystem::exists(path)) {
    std::ifstream in(path);
    std::stringstream text;
    text << in.rdbuf();
    const std::string id(absl::StripAsciiWhitespace(text.str()));
    if (!server::IsValidMemberName(id)) {
      return absl::FailedPreconditionError(
          absl::StrCat(path.string(), " holds '", id, "', not a run id (1..64 of [A-Za-z0-9._-])"));
    }
    return id;
  }
  SPLITQ_ASSIGN_OR_RETURN(const std::string token, server::MakeToken());  // random hex
  const std::string id = token.substr(0, 16);
  SPLITQ_RETURN_IF_ERROR(base::WriteFileAtomically(path, id + "\n", 0644));
  return id;
}

struct ClientCommandOptions {
  std::string config_path, coordinator, id, token_path, shard = "0/1", out_dir, init;
  std::vector<std::string> overrides;
  server::TransportSecurity security;
  int connect_timeout_s = 120, reconnect_timeout_s = 300;
  int micro_batches = 0;  // 0: the config's client.micro_batches
  int chunk_kib = 1024;   // activation frames go up in chunks of this size
};

// A ServerLink to whichever worker the coordinator assigns, reconnecting after failures.
class ReconnectingLink : public trainer::ServerLink {
 public:
  ReconnectingLink(server::CoordinatorClient& coordinator, const ClientCommandOptions& opt,
                   server::WorkerLinkOptions link_options)
      : coordinator_(coordinator), opt_(opt), link_options_(std::move(link_options)) {}

  // Registers (retrying while the coordinator is unreachable) and connects to a worker
  // (retrying while none is available).
  absl::Status Connect(std::chrono::seconds timeout) {
    return server::RetryWithBackoff([this] { return ConnectOnce(); },
                                    [](const absl::Status& s) {
                                      // Ctrl-C while connecting stops, not retries.
                                      return server::IsTransient(s) && !g_interrupt.load();
                                    },
                                    timeout, Report());
  }

  absl::StatusOr<trainer::DownFrame> Train(const trainer::UpFrame& up) override {
    return Succeeded(link_->Train(up));
  }
  absl::StatusOr<trainer::DownFrame> TrainHead(const trainer::HeadGradient& head) override {
    return Succeeded(link_->TrainHead(head));
  }
  absl::StatusOr<trainer::EvalPiece> Evaluate(const trainer::UpFrame& up) override {
    return Succeeded(link_->Evaluate(up));
  }
  // Failures in a row back off (0.2 s doubling to 5 s, as in Connect) until a call succeeds;
  // after --reconnect-timeout seconds without one, the client gives up.
  absl::Status Recover(const absl::Status& error) override {
    if (!server::IsTransient(error) && error.code() != absl::StatusCode::kNotFound) return error;
    const auto now = std::chrono::steady_clock::now();
    if (failures_ == 0) failing_since_ = now;
    if (now - failing_since_ > std::chrono::seconds(opt_.reconnect_timeout_s)) {
      return absl::UnavailableError(absl::StrCat("no progress for ", opt_.reconnect_timeout_s,
                                                 " s; last error: ", error.ToString()));
    }
    const auto wait =
        std::chrono::milliseconds(std::min<int64_t>(5000, 200LL << std::min(failures_, 5)));
    ++failures_;
    // A worker that refused us as full: the coordinator is asked for another one.
    if (link_ && link_->refused_full()) unreachable_ = assigned_;
    std::fprintf(stderr, "\nclient %s: the worker stream failed (%s); reconnecting in %lld ms\n",
                 opt_.id.c_str(), error.ToString().c_str(), static_cast<long long>(wait.count()));
    link_.reset();
    std::this_thread::sleep_for(wait);
    const absl::Status s = Connect(std::chrono::seconds(opt_.reconnect_timeout_s));
    if (s.ok()) {
      std::fprintf(stderr, "client %s: reconnected to worker %s\n", opt_.id.c_str(),
                   worker_.c_str());
    }
    return s;
  }

  uint64_t member_id() const { return member_id_.load(); }
  // The heartbeat period of the coordinator's last answer to Register.
  std::chrono::milliseconds heartbeat_period() const {
    return std::chrono::milliseconds(heartbeat_ms_.load());
  }
  void Close() {
    if (link_) link_->Close();
  }

  // ALREADY_EXISTS (the id is registered and alive: a previous run of this client that the
  // coordinator has not yet seen die, or a concurrent re-registration) comes back as
  // UNAVAILABLE, to be retried.
  absl::StatusOr<uint64_t> Register() {
    auto r = coordinator_.Register(server::Role::kClient, opt_.id);
    if (r.status().code() == absl::StatusCode::kAlreadyExists) {
      return absl::UnavailableError(
          absl::StrCat("client id ", opt_.id, " is registered and alive (a previous run?)"));
    }
    if (!r.ok()) return r.status();
    heartbeat_ms_.store(r->heartbeat_period.count());
    member_id_.store(r->member_id);
    return r->member_id;
  }

 private:
  std::function<void(const absl::Status&, std::chrono::milliseconds)> Report() const {
    return [this](const absl::Status& s, std::chrono::milliseconds wait) {
      std::fprintf(stderr, "client %s: %s; retrying in %lld ms\n", opt_.id.c_str(),
                   std::string(s.message()).c_str(), static_cast<long long>(wait.count()));
    };
  }

  absl::Status ConnectOnce() {
    if (g_interrupt.load()) return absl::CancelledError("interrupted");
    if (member_id_.load() == 0) SPLITQ_RETURN_IF_ERROR(Register().status());
    uint64_t member = member_id_.load();
    auto assignment = coordinator_.Assign(member, unreachable_);
    if (assignment.status().code() == absl::StatusCode::kNotFound) {  // marked dead: again
      // Unless the heartbeat thread registered again meanwhile (its id stays).
      member_id_.compare_exchange_strong(member, 0);
      return absl::UnavailableError("the coordinator forgot this client; registering again");
    }
    if (!assignment.ok()) return assignment.status();
    const std::string target = JoinHostPort(assignment->worker);
    auto channel = MakeChannel(target, opt_.security);
    if (!channel.ok()) return channel.status();
    // Wait for the connection so that a dead worker shows up here, not in the middle of a step.
    if (!(*channel)->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(5))) {
      unreachable_ = assignment->worker_name;  // the next Assign asks for another one
      return absl::UnavailableError(
          absl::StrCat("worker ", assignment->worker_name, " at ", target, " does not answer"));
    }
    unreachable_.clear();
    link_ = std::make_unique<server::WorkerClient>(*channel, link_options_);
    assigned_ = assignment->worker_name;
    worker_ = absl::StrCat(assignment->worker_name, " at ", target);
    return absl::OkStatus();
  }

  template <typename T>
  absl::StatusOr<T> Succeeded(absl::StatusOr<T> result) {
    if (result.ok()) failures_ = 0;
    return result;
  }

  server::CoordinatorClient& coordinator_;
  const ClientCommandOptions& opt_;
  int failures_ = 0;
  std::chrono::steady_clock::time_point failing_since_;
  server::WorkerLinkOptions link_options_;
  std::unique_ptr<server::WorkerClient> link_;
  std::atomic<uint64_t> member_id_{0};
  std::atomic<int64_t> heartbeat_ms_{1000};
  std::string worker_;
  std::string assigned_;     // the worker's name
  std::string unreachable_;  // a worker we could not reach, or that was full: avoid it

 public:
  const std::string& worker() const { return worker_; }
};

// Publishes the step count for the heartbeat thread.
class CountingRunner : public trainer::StepRunner {
 public:
  explicit CountingRunner(trainer::StepRunner& inner) : inner_(inner), steps_(inner.step()) {}
  absl::StatusOr<trainer::StepStats> Step() override {
    auto s = inner_.Step();
    steps_.store(inner_.step());
    return s;
  }
  absl::StatusOr<trainer::EvalStats> Evaluate() override { return inner_.Evaluate(); }
  absl::Status SaveCheckpoint(const std::string& p, const std::vector<double>& d) const override {
    return inner_.SaveCheckpoint(p, d);
  }
  absl::Status LoadCheckpoint(const std::string& p, std::vector<double>* d) override {
    absl::Status s = inner_.LoadCheckpoint(p, d);
    steps_.store(inner_.step());
    return s;
  }
  int64_t step() const override { return inner_.step(); }
  const trainer::RunConfig& config() const override { return inner_.config(); }
  trainer::WireTotals wire() const override { return inner_.wire(); }
  std::string device() const override { return inner_.device(); }
  int64_t steps() const { return steps_.load(); }

 private:
  trainer::StepRunner& inner_;
  std::atomic<int64_t> steps_;
};

int Fail(const std::string& id, const char* what, const absl::Status& status, int code = 2) {
  std::fprintf(stderr, "client %s: %s: %s\n", id.c_str(), what, status.ToString().c_str());
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
  if (absl::Status s = server::ValidateSecurity(opt.security); !s.ok()) {
    return Fail(opt.id, "flags", s);
  }
  if (!server::IsValidMemberName(opt.id)) {
    return Fail(opt.id, "--id", absl::InvalidArgumentError("1..64 of [A-Za-z0-9._-]"));
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
  auto run_id = RunId(train_options.out_dir);
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
    std::fprintf(stderr, "client %s: %d slices of a batch of %lld: using %lld\n", opt.id.c_str(),
                 micro_batches, static_cast<long long>(config->batch_size),
                 static_cast<long long>(config->batch_size));
    micro_batches = static_cast<int>(config->batch_size);
  }
  (*part)->set_micro_batches(micro_batches);

  auto channel = MakeChannel(opt.coordinator, opt.security);
  if (!channel.ok()) return Fail(opt.id, "--coordinator", channel.status());
  server::CoordinatorClient coordinator(*channel, *token);
  server::WorkerLinkOptions link_options;
  link_options.client_id = opt.id;
  link_options.token = *token;
  link_options.config_digest = *digest;
  link_options.run_id = *run_id;
  link_options.chunk_bytes = int64_t{opt.chunk_kib} << 10;
  ReconnectingLink link(coordinator, opt, link_options);
  std::signal(SIGINT, OnInterrupt);
  std::signal(SIGTERM, OnInterrupt);
  if (absl::Status s = link.Connect(std::chrono::seconds(opt.connect_timeout_s)); !s.ok()) {
    if (g_interrupt.load()) return 128 + g_signal.load();  // Ctrl-C while connecting
    return Fail(opt.id, "connect", s, 1);
  }
  std::fprintf(stderr,
               "client %s: shard %s, worker %s; client part on %s in %d slice(s) of the batch, "
               "RSS %.0f MiB\n",
               opt.id.c_str(), opt.shard.c_str(), link.worker().c_str(), (*part)->device().c_str(),
               micro_batches, RssMiB());

  trainer::ClientRunner runner(**part, link);
  CountingRunner counting(runner);
  const bool tty = isatty(fileno(stderr)) != 0;
  train_options.interrupt = &g_interrupt;
  train_options.progress = [tty, &opt](const std::string& line) {
    std::fprintf(stderr, tty ? "\r\033[K%s: %s" : "%s: %s\n", opt.id.c_str(), line.c_str());
    std::fflush(stderr);
  };
  train_options.note = [tty, &opt](const std::string& line) {
    std::fprintf(stderr, tty ? "\r\033[K%s: %s\n" : "%s: %s\n", opt.id.c_str(), line.c_str());
  };
  absl::StatusOr<trainer::TrainSummary> summary;
  {
    server::Heartbeater heartbeat(
        coordinator, link.member_id(), link.heartbeat_period(),
        [&counting] {
          return server::Heartbeater::Progress{static_cast<uint64_t>(counting.steps()), 0};
        },
        [&link, &opt]() -> absl::StatusOr<uint64_t> {
          const uint64_t before = link.member_id();
          auto id = link.Register();
          // The main thread registered meanwhile (our Register then found the name taken).
          const uint64_t now = link.member_id();
          if (!id.ok() && now != 0 && now != before) return now;
          if (id.ok()) {
            std::fprintf(stderr,
                         "client %s registered again with the coordinator (it had lost us)\n",
                         opt.id.c_str());
          }
          return id;
        },
        [&opt](const std::string& line) {
          std::fprintf(stderr, "\nclient %s: %s\n", opt.id.c_str(), line.c_str());
        });
    summary = trainer::RunTraining(counting, train_options);
    link.Close();
  }
  // After the heartbeat thread has stopped, so that no beat re-registers us after the goodbye,
  // with the id of our last registration (the heartbeat thread registers through `link`).
  (void)coordinator.Leave(link.member_id());
  if (tty) std::fprintf(stderr, "\n");
  if (!summary.ok()) {
    std::fprintf(stderr, "client %s: %s\n", opt.id.c_str(),
                 std::string(summary.status().message()).c_str());
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
  cmd->add_option("--id", opt->id, "This client's id (1..64 of [A-Za-z0-9._-])")->required();
  cmd->add_option("--token", opt->token_path, "This client's bearer token file");
  cmd->add_option("--shard", opt->shard, "K/N: train on samples with id % N == K (default 0/1)");
  cmd->add_option("--out", opt->out_dir,
                  "Output directory (default runs/<id>); resumes from "
                  "its checkpoint.pt when there is one");
  cmd->add_option("--init", opt->init, "Base weights checkpoint (LoRA runs)");
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
  cmd->add_option("--reconnect-timeout", opt->reconnect_timeout_s,
                  "Seconds to keep trying after the worker stream failed")
      ->check(IntRange(1, 1 << 30));
  cmd->callback([opt, run] { *run = [opt] { return RunClient(*opt); }; });
}

}  // namespace splitq::cli
