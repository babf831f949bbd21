#include "tools/demo.h"

#include <fcntl.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/files.h"
#include "server/tls_certs.h"
#include "server/tokens.h"
#include "trainer/config.h"
#include "trainer/train_loop.h"

namespace splitq::tools {
namespace {

constexpr char kDefaultConfig[] = R"(# splitq demo: the embedded default run.
# Fashion-MNIST CNN split after its second block; AMAQ at the boundary with a bit budget
# shrinking from 8 to 4; 6-bit stochastic gradients. Each client trains its own shard.
task: fmnist
seed: 0
steps: 400
batch_size: 64
log_every: 50
eval_every: 200
model: {split_after: 2}
optim: {lr: 1.0e-3, warmup_steps: 50}
quant:
  activations:
    mode: amaq
    bits: {min: 2, max: 8}
    target: [{step: 0, bits: 8}, {step: 100, bits: 8}, {step: 300, bits: 4, curve: cosine}]
    gate: {alpha: 2.0, lr: 0.01, beta: 1.0e-3, lambda: 1.0}
    calibration_steps: 50
  gradients:
    mode: uniform
    bits: {min: 4, max: 8}
    target: 6
    rounding: stochastic
)";

std::atomic<bool> g_interrupt{false};
void OnInterrupt(int) { g_interrupt.store(true); }

struct Child {
  pid_t pid = -1;
  std::string name;
  std::string log;  // stdout and stderr, when not inherited
};

// Starts `splitq ARGS...` (this binary). With `log`, its stdout and stderr go to that file
// (appended); without, they are the demo's.
absl::StatusOr<Child> Spawn(const std::string& name, const std::vector<std::string>& args,
                            const std::string& log) {
  int log_fd = -1;
  if (!log.empty()) {
    log_fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (log_fd < 0) return absl::InternalError(log + ": " + strerror(errno));
  }
  std::vector<std::string> argv_s = {"/proc/self/exe"};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  const pid_t pid = fork();
  if (pid < 0) return absl::InternalError("fork: " + std::string(strerror(errno)));
  if (pid == 0) {
    if (log_fd >= 0) {
      dup2(log_fd, STDOUT_FILENO);
      dup2(log_fd, STDERR_FILENO);
    }
    // Its own process group, so a Ctrl-C reaches only the demo, which stops its children in
    // order (clients first); and a SIGTERM if the demo dies.
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    std::vector<char*> argv;
    for (std::string& a : argv_s) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv("/proc/self/exe", argv.data());
    _exit(127);
  }
  if (log_fd >= 0) close(log_fd);
  return Child{pid, name, log};
}

// Waits for the child's --ready-file (server/process.h, ReadyFile); returns the HOST:PORT in
// it. An error names the log when the child exits first or the time runs out.
absl::StatusOr<std::string> WaitReady(Child& child, const std::string& ready_file, int timeout_s) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  while (std::chrono::steady_clock::now() < end && !g_interrupt.load()) {
    std::ifstream in(ready_file);
    std::string address;
    if (std::getline(in, address) && !address.empty()) return address;
    int status = 0;
    if (waitpid(child.pid, &status, WNOHANG) == child.pid) {
      child.pid = -1;
      return absl::InternalError(
          absl::StrCat(child.name, " exited before it was ready; see ", child.log));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return absl::DeadlineExceededError(
      absl::StrCat(child.name, " was not ready within ", timeout_s, " s; see ", child.log));
}

void Stop(Child& child, int signal) {
  if (child.pid > 0) kill(child.pid, signal);
}

int Wait(Child& child) {
  int status = 0;
  if (child.pid <= 0) return 0;
  waitpid(child.pid, &status, 0);
  child.pid = -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// The clients' summaries as one: steps and bytes summed, the rest averaged (max for the
// budget excess, the longest wall time).
trainer::TrainSummary Combine(const std::vector<trainer::TrainSummary>& parts) {
  trainer::TrainSummary all;
  const double n = static_cast<double>(parts.size());
  all.task = parts.front().task;
  all.device = parts.front().device;
  all.max_budget_excess = -1e9;
  all.clients = static_cast<int64_t>(parts.size());
  all.act_budget = parts.front().act_budget;  // one config, one schedule
  all.grad_budget = parts.front().grad_budget;
  all.val_accuracy = parts.front().val_accuracy < 0 ? -1 : 0;  // -1: not this task (null)
  all.val_bits_per_byte = parts.front().val_bits_per_byte < 0 ? -1 : 0;
  for (const trainer::TrainSummary& s : parts) {
    all.steps += s.steps;
    all.bytes_up += s.bytes_up;
    all.bytes_down += s.bytes_down;
    all.bytes_fp32_equivalent += s.bytes_fp32_equivalent;
    all.entropy.elements_up += s.entropy.elements_up;
    all.entropy.elements_down += s.entropy.elements_down;
    all.entropy.bits_up += s.entropy.bits_up;
    all.entropy.bits_down += s.entropy.bits_down;
    all.val_loss += s.val_loss / n;
    if (all.val_accuracy >= 0) all.val_accuracy += s.val_accuracy / n;
    if (all.val_bits_per_byte >= 0) all.val_bits_per_byte += s.val_bits_per_byte / n;
    all.avg_act_bits += s.avg_act_bits / n;
    all.avg_grad_bits += s.avg_grad_bits / n;
    all.wall_seconds = std::max(all.wall_seconds, s.wall_seconds);
    all.max_budget_excess = std::max(all.max_budget_excess, s.max_budget_excess);
    if (s.steps_lost >= 0) all.steps_lost = std::max<int64_t>(all.steps_lost, 0) + s.steps_lost;
  }
  return all;
}

bool SameDigests(const trainer::TrainSummary& summary) {
  for (const trainer::WorkerReport& w : summary.workers) {
    if (w.weights_sha256 != summary.workers.front().weights_sha256) return false;
  }
  return true;
}

// The workers' reports (DIR/<name>/worker.json) into `summary`.
absl::Status AddWorkers(const std::vector<std::string>& names, const std::filesystem::path& dir,
                        trainer::TrainSummary* summary) {
  int64_t applied = 0, updates = 0;
  for (const std::string& name : names) {
    const std::string path = (dir / name / "worker.json").string();
    trainer::WorkerReport w;
    try {
      const YAML::Node n = YAML::LoadFile(path);  // JSON is YAML
      w.name = n["name"].as<std::string>();
      w.rank = n["rank"].as<int64_t>();
      w.server_updates = n["server_updates"].as<int64_t>();
      w.steps_applied = n["steps_applied"].as<int64_t>();
      w.updates_here = n["updates_here"].as<int64_t>();
      w.weights_sha256 = n["weights_sha256"].as<std::string>();
    } catch (const YAML::Exception& e) {
      return absl::DataLossError(absl::StrCat(path, ": not a worker report: ", e.what()));
    }
    applied += w.steps_applied;
    // The workers of a demo are one group: its updates are each replica's (all take every one).
    updates = std::max(updates, w.updates_here);
    summary->workers.push_back(std::move(w));
  }
  summary->mean_clients_per_update =
      updates > 0 ? static_cast<double>(applied) / static_cast<double>(updates) : -1;
  return absl::OkStatus();
}

}  // namespace

int RunDemo(const DemoOptions& opt,
            const std::function<void(const trainer::TrainSummary&)>& print_summary) {
  namespace fs = std::filesystem;
  const auto start = std::chrono::steady_clock::now();
  const fs::path dir(opt.out_dir);
  std::error_code ec;
  fs::create_directories(dir / "logs", ec);
  if (ec) {
    spdlog::error("demo: {}: {}", opt.out_dir, ec.message());
    return 2;
  }
  if (fs::exists(dir / "summary.json", ec)) {
    spdlog::info(
        "demo: {} holds a finished run: its clients resume from their checkpoints, with "
        "nothing left to train (--out DIR starts a new run elsewhere)\n",
        opt.out_dir);
  } else if (fs::exists(dir / "client0" / "checkpoint.pt", ec)) {
    spdlog::info("demo: {} holds a stopped run: resuming it (--out DIR starts a new one)",
                 opt.out_dir);
  }
  // The config every process loads (one file, so one digest).
  const std::string config = (dir / "config.yaml").string();
  if (opt.config_path.empty()) {
    if (absl::Status s = base::WriteFileAtomically(config, kDefaultConfig); !s.ok()) {
      spdlog::error("demo: {}", s.ToString());
      return 2;
    }
  } else if (fs::absolute(opt.config_path) != fs::absolute(config)) {
    fs::copy_file(opt.config_path, config, fs::copy_options::overwrite_existing, ec);
    if (ec) {
      spdlog::error("demo: --config {}: {}", opt.config_path, ec.message());
      return 2;
    }
  }
  auto parsed = trainer::LoadRunConfig(config);
  if (!parsed.ok()) {
    spdlog::error("demo: config error: {}", std::string(parsed.status().message()));
    return 2;
  }
  const std::string certs = (dir / "certs").string(), tokens = (dir / "tokens").string();
  std::vector<std::string> ids, workers;
  for (int i = 0; i < opt.workers; ++i) workers.push_back(absl::StrCat("worker", i));
  for (int i = 0; i < opt.clients; ++i) ids.push_back(absl::StrCat("client", i));
  if (absl::Status s = server::MakeCertificates(certs); !s.ok()) {
    spdlog::error("demo: certificates: {}", s.ToString());
    return 1;
  }
  if (absl::Status s = server::WriteTokens(tokens, ids, workers); !s.ok()) {
    spdlog::error("demo: tokens: {}", s.ToString());
    return 1;
  }
  spdlog::info("demo: {}, {} clients; fresh certificates in {}, tokens in {}", config, opt.clients,
               certs, tokens);
  signal(SIGINT, OnInterrupt);
  signal(SIGTERM, OnInterrupt);
  const std::vector<std::string> tls = {"--tls-dir", certs};
  const std::string token_file = (fs::path(tokens) / "tokens").string();

  std::vector<Child> servers;
  auto stop_servers = [&] {
    for (auto it = servers.rbegin(); it != servers.rend(); ++it) Stop(*it, SIGTERM);
    for (auto it = servers.rbegin(); it != servers.rend(); ++it) Wait(*it);
  };
  // Spawns a server; its ready file is logs/<log_name>.address.
  auto spawn_server = [&](const std::string& name, const std::string& log_name,
                          std::vector<std::string> args) -> absl::StatusOr<std::string> {
    args.insert(args.end(), tls.begin(), tls.end());
    const std::string log = (dir / "logs" / (log_name + ".log")).string();
    const std::string ready = (dir / "logs" / (log_name + ".address")).string();
    std::filesystem::remove(log);
    std::filesystem::remove(ready);  // a stale one from a run that was killed
    args.insert(args.end(), {"--ready-file", ready});
    auto child = Spawn(name, args, log);
    if (!child.ok()) return child.status();
    servers.push_back(*child);
    return ready;
  };
  auto wait_server = [&](size_t index, const std::string& ready) -> absl::StatusOr<std::string> {
    auto address = WaitReady(servers[index], ready, opt.startup_timeout_s);
    if (address.ok()) {
      spdlog::info("demo: {} listening on {}", servers[index].name, address->c_str());
    }
    return address;
  };
  absl::StatusOr<std::string> coordinator = spawn_server(
      "coordinator", "coordinator",
      {"coordinator", "--config", config, "--listen", "127.0.0.1:0", "--tokens", token_file});
  if (coordinator.ok()) coordinator = wait_server(0, *coordinator);
  absl::Status started = coordinator.status();
  // The workers start together (the group waits for all of them before its first round), then
  // each is waited for.
  std::vector<std::string> ready_files;
  for (int i = 0; started.ok() && i < opt.workers; ++i) {
    std::vector<std::string> args = {"worker",
                                     "--config",
                                     config,
                                     "--coordinator",
                                     *coordinator,
                                     "--listen",
                                     "127.0.0.1:0",
                                     "--name",
                                     workers[i],
                                     "--tokens",
                                     token_file,
                                     "--token",
                                     (fs::path(tokens) / (workers[i] + ".token")).string(),
                                     "--out",
                                     (dir / workers[i]).string()};
    if (opt.workers > 1) {
      args.insert(args.end(), {"--group-size", absl::StrCat(opt.workers)});
    }
    // The first worker's log keeps its old name (logs/worker.log).
    auto ready = spawn_server(workers[i], i == 0 ? "worker" : workers[i], args);
    started = ready.status();
    if (ready.ok()) ready_files.push_back(*ready);
  }
  for (size_t i = 0; started.ok() && i < ready_files.size(); ++i) {
    started = wait_server(i + 1, ready_files[i]).status();
  }
  if (!started.ok()) {
    spdlog::error("demo: {}", started.ToString());
    stop_servers();
    return 1;
  }

  std::vector<Child> clients;
  for (int i = 0; i < opt.clients; ++i) {
    const std::string id = absl::StrCat("client", i);
    auto child =
        Spawn(id,
              {"client", "--config", config, "--coordinator", *coordinator, "--id", id, "--token",
               (fs::path(tokens) / (id + ".token")).string(), "--shard",
               absl::StrCat(i, "/", opt.clients), "--out", (dir / id).string(), "--tls-dir", certs},
              "");
    if (!child.ok()) {
      spdlog::error("demo: {}", child.status().ToString());
      g_interrupt.store(true);
      break;
    }
    clients.push_back(*child);
  }
  // Wait for the clients; an interrupt is passed on to them (they checkpoint and stop).
  int failures = 0;
  bool forwarded = false;
  for (Child& c : clients) {
    for (;;) {
      if (g_interrupt.load() && !forwarded) {
        for (Child& other : clients) Stop(other, SIGTERM);
        forwarded = true;
      }
      int status = 0;
      const pid_t done = waitpid(c.pid, &status, WNOHANG);
      if (done == c.pid) {
        const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        c.pid = -1;
        if (code != 0) {
          ++failures;
          spdlog::warn("demo: {} exited with {}", c.name, code);
        }
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  stop_servers();
  if (failures > 0 || g_interrupt.load()) {
    spdlog::error("demo: stopped ({} client(s) failed); logs in {}", failures,
                  (dir / "logs").string());
    return 1;
  }
  std::vector<trainer::TrainSummary> parts;
  for (const Child& c : clients) {
    auto s = trainer::ReadSummary((dir / c.name / "summary.json").string());
    if (!s.ok()) {
      spdlog::error("demo: {}", s.status().ToString());
      return 1;
    }
    parts.push_back(*s);
  }
  trainer::TrainSummary all = Combine(parts);
  if (absl::Status w = AddWorkers(workers, dir, &all); !w.ok()) {
    spdlog::error("demo: {}", w.ToString());
    return 1;
  }
  all.wall_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const std::string summary_path = (dir / "summary.json").string();
  if (absl::Status s = trainer::WriteSummary(all, summary_path); !s.ok()) {
    spdlog::error("demo: {}", s.ToString());
    return 1;
  }
  if (opt.workers == 1) {
    std::printf("demo: %d clients through one worker; all clients together:\n", opt.clients);
  } else {
    std::printf("demo: %d clients through a group of %d workers (%s); all clients together:\n",
                opt.clients, opt.workers,
                SameDigests(all) ? "identical replicas" : "REPLICAS DIFFER");
  }
  if (print_summary) print_summary(all);
  std::printf("wrote %s\n", summary_path.c_str());
  std::printf("(per client: %s/client<i>/; server logs: %s/logs/)\n", opt.out_dir.c_str(),
              opt.out_dir.c_str());
  std::string dirs;
  for (int c = 0; c < opt.clients; ++c) absl::StrAppend(&dirs, " ", opt.out_dir, "/client", c);
  std::printf("curves: splitq report%s --out %s/report.html\n", dirs.c_str(), opt.out_dir.c_str());
  return 0;
}

}  // namespace splitq::tools
