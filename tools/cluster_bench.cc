#include "tools/cluster_bench.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <memory>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/files.h"
#include "client/worker_client.h"
#include "server/process.h"
#include "server/worker_core.h"
#include "server/worker_service.h"
#include "trainer/client_part.h"
#include "trainer/server_part.h"
#include "trainer/step.h"

namespace splitq::tools {
namespace {

using Clock = std::chrono::steady_clock;

// Every party waits until all `count` have arrived (C++17 has no std::barrier).
class StartLine {
 public:
  explicit StartLine(int count) : left_(count) {}
  void ArriveAndWait() {
    std::unique_lock<std::mutex> lock(mutex_);
    if (--left_ == 0) {
      go_.notify_all();
      return;
    }
    go_.wait(lock, [this] { return left_ == 0; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable go_;
  int left_;
};

struct Row {
  int clients = 0;
  int64_t merge = 1;
  double samples_per_s = 0;
  double ms_per_step = 0;  // a client's mean step time
  double clients_per_update = 0;
  trainer::RoundTimes times;  // the worker's merged rounds in the measured steps
};

// N clients against one worker; every client runs `warmup` steps, then all start together and
// run `steps` steps. Returns the measured row.
absl::StatusOr<Row> RunCluster(const trainer::RunConfig& config, const std::string& init, int n,
                               int steps, int warmup, const server::MergeOptions& merge) {
  auto part = trainer::ServerPart::Create(config, init);
  if (!part.ok()) return part.status();
  server::WorkerOptions core_options;
  core_options.max_sessions = static_cast<uint32_t>(n);
  server::WorkerCore core(**part, core_options);
  server::WorkerServiceOptions service_options;
  service_options.merge = merge;
  server::WorkerService service(core, nullptr, service_options);
  server::ServingOptions serving;
  serving.listen = "127.0.0.1:0";
  serving.security.insecure = true;
  serving.max_receive_message_bytes = rpc::MaxMessageBytes(core_options.assembler);
  auto started = server::StartServing(serving, {&service});
  if (!started.ok()) return started.status();
  const std::string address = absl::StrCat("127.0.0.1:", started->port);

  std::vector<std::unique_ptr<trainer::ClientPart>> clients;
  for (int i = 0; i < n; ++i) {
    auto c = trainer::ClientPart::Create(config, init, false, trainer::DataShard{i, n});
    if (!c.ok()) return c.status();
    clients.push_back(std::move(*c));
  }
  std::vector<absl::Status> errors(n);
  std::vector<double> seconds(n, 0);
  StartLine start(n + 1);
  std::atomic<bool> failed{false};
  Clock::time_point t0;
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      rpc::TransportSecurity insecure;
      insecure.insecure = true;
      auto channel = client::MakeChannel(address, insecure);
      absl::Status status = channel.status();
      std::unique_ptr<client::WorkerClient> link;
      std::unique_ptr<trainer::ClientRunner> runner;
      if (status.ok()) {
        client::WorkerLinkOptions o;
        o.client_id = absl::StrCat("bench", i);
        link = std::make_unique<client::WorkerClient>(*channel, o);
        runner = std::make_unique<trainer::ClientRunner>(*clients[i], *link);
      }
      for (int s = 0; status.ok() && s < warmup; ++s) status = runner->Step().status();
      if (!status.ok()) failed.store(true);
      start.ArriveAndWait();
      const auto begin = Clock::now();
      for (int s = 0; status.ok() && !failed.load() && s < steps; ++s) {
        status = runner->Step().status();
      }
      seconds[i] = std::chrono::duration<double>(Clock::now() - begin).count();
      errors[i] = status;
      if (!status.ok()) failed.store(true);
    });
  }
  start.ArriveAndWait();
  t0 = Clock::now();
  const server::WorkerStats before = core.stats();
  const trainer::RoundTimes times_before = (*part)->round_times();
  for (std::thread& t : threads) t.join();
  const double wall = std::chrono::duration<double>(Clock::now() - t0).count();
  const server::WorkerStats after = core.stats();
  trainer::RoundTimes times = (*part)->round_times();
  started->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  for (int i = 0; i < n; ++i) {
    if (!errors[i].ok()) {
      return absl::Status(errors[i].code(), absl::StrCat("client ", i, ": ", errors[i].message()));
    }
  }
  Row row;
  times.Add(times_before, -1);  // the measured steps' rounds only
  row.times = times;
  row.clients = n;
  row.merge = merge.max_clients;
  row.samples_per_s = static_cast<double>(n) * steps * config.batch_size / wall;
  double sum = 0;
  for (double s : seconds) sum += s;
  row.ms_per_step = 1000 * sum / n / steps;
  const int64_t updates = after.updates_here - before.updates_here;
  row.clients_per_update =
      updates > 0 ? static_cast<double>(after.steps_applied - before.steps_applied) / updates : 0;
  return row;
}

// One process at batch `batch`: `splitq train`'s step (ClientPart + ServerPart in memory).
absl::StatusOr<double> OneProcess(trainer::RunConfig config, const std::string& init, int64_t batch,
                                  int steps, int warmup) {
  config.batch_size = batch;
  auto client = trainer::ClientPart::Create(config, init, false);
  if (!client.ok()) return client.status();
  auto server = trainer::ServerPart::Create(config, init);
  if (!server.ok()) return server.status();
  trainer::LocalServerLink link(**server);
  trainer::ClientRunner runner(**client, link);
  for (int s = 0; s < warmup; ++s) {
    if (auto r = runner.Step(); !r.ok()) return r.status();
  }
  const auto begin = Clock::now();
  for (int s = 0; s < steps; ++s) {
    if (auto r = runner.Step(); !r.ok()) return r.status();
  }
  const double wall = std::chrono::duration<double>(Clock::now() - begin).count();
  return static_cast<double>(steps) * batch / wall;
}

}  // namespace

int RunClusterBench(const ClusterBenchOptions& opt) {
  auto loaded = trainer::LoadRunConfig(opt.config_path, opt.overrides);
  if (!loaded.ok()) {
    spdlog::error("bench cluster: {}", loaded.status().ToString());
    return 2;
  }
  trainer::RunConfig config = *loaded;
  config.eval_every = 1 << 30;  // no validation inside the measured steps
  std::printf("bench cluster: %s, batch %lld per client, %d steps after %d warm-up (device %s)\n",
              opt.config_path.c_str(), static_cast<long long>(config.batch_size), opt.steps,
              opt.warmup, config.device.c_str());
  std::printf("%8s %7s | %14s %10s %8s | %7s %7s | %s\n", "clients", "threads", "samples/s",
              "ms/step", "cl/upd", "m/1", "m/proc",
              "per merged round: decode, fwd+bwd, gradients, update ms");
  std::string json = "[";
  std::vector<int64_t> thread_counts = opt.merge_threads;
  if (thread_counts.empty()) thread_counts.push_back(config.merge_threads);
  for (int n : opt.clients) {
    server::MergeOptions off;
    auto a = RunCluster(config, opt.init, n, opt.steps, opt.warmup, off);
    if (!a.ok()) {
      spdlog::error("bench cluster: {} clients: {}", n, a.status().ToString());
      return 1;
    }
    std::printf("%8d %7s | %14.1f %10.1f %8.2f |\n", n, "1-by-1", a->samples_per_s, a->ms_per_step,
                a->clients_per_update);
    std::vector<std::pair<int64_t, Row>> merged;
    for (int64_t threads : thread_counts) {
      server::MergeOptions on;
      on.max_clients = opt.merge > 0 ? opt.merge : n;
      on.max_targets = config.merge_max_targets;
      on.window_ms = opt.window_ms >= 0 ? opt.window_ms : config.merge_window_ms;
      trainer::RunConfig with = config;
      with.merge_threads = threads;
      auto b = RunCluster(with, opt.init, n, opt.steps, opt.warmup, on);
      if (!b.ok()) {
        spdlog::error("bench cluster: {} clients merged: {}", n, b.status().ToString());
        return 1;
      }
      merged.emplace_back(threads, *b);
    }
    auto one = OneProcess(config, opt.init, config.batch_size * n, opt.steps, opt.warmup);
    if (!one.ok()) {
      spdlog::error("bench cluster: {} clients: {}", n, one.status().ToString());
      return 1;
    }
    std::printf("%8d %7s | %14.1f %10s %8s |\n", n, "1 proc", *one, "", "");
    for (const auto& [threads, b] : merged) {
      const trainer::RoundTimes& t = b.times;
      const double r = t.rounds > 0 ? static_cast<double>(t.rounds) : 1.0;
      std::printf(
          "%8d %7s | %14.1f %10.1f %8.2f | %7.2f %7.2f | %.2f, %.2f, %.2f, %.2f (%lld rounds)\n", n,
          threads == 0 ? "auto" : std::to_string(threads).c_str(), b.samples_per_s, b.ms_per_step,
          b.clients_per_update, b.samples_per_s / a->samples_per_s, b.samples_per_s / *one,
          t.inputs_ms / r, t.compute_ms / r, t.gradients_ms / r, t.update_ms / r,
          static_cast<long long>(t.rounds));
      absl::StrAppendFormat(
          &json,
          "%s\n  {\"clients\": %d, \"merge_threads\": %d, \"one_at_a_time_samples_per_s\": %.3f, "
          "\"merged_samples_per_s\": %.3f, \"merge_max_clients\": %d, "
          "\"clients_per_update\": %.3f, \"one_process_samples_per_s\": %.3f, "
          "\"one_at_a_time_ms_per_step\": %.3f, \"merged_ms_per_step\": %.3f, "
          "\"round_ms\": {\"decode\": %.3f, \"compute\": %.3f, \"gradients\": %.3f, "
          "\"update\": %.3f}, \"rounds\": %d}",
          json.size() > 1 ? "," : "", n, threads, a->samples_per_s, b.samples_per_s, b.merge,
          b.clients_per_update, *one, a->ms_per_step, b.ms_per_step, t.inputs_ms / r,
          t.compute_ms / r, t.gradients_ms / r, t.update_ms / r, t.rounds);
    }
    std::fflush(stdout);
  }
  json += "\n]\n";
  std::printf(
      "samples/s: examples per second over all clients; threads: server.merge.threads of the "
      "merged run (1-by-1: one step at a time; 1 proc: one process at batch clients x "
      "batch_size); m/1: merged over one-at-a-time; m/proc: merged over one process\n");
  if (!opt.json_path.empty()) {
    if (absl::Status s = base::WriteFileAtomically(opt.json_path, json); !s.ok()) {
      spdlog::error("bench cluster: {}", s.ToString());
      return 1;
    }
  }
  return 0;
}

}  // namespace splitq::tools
