#include "tools/allreduce_bench.h"

#include <spdlog/spdlog.h>
#include <torch/cuda.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <thread>

#include "absl/strings/str_format.h"
#include "trainer/config.h"
#include "trainer/replica_group.h"
#include "trainer/server_part.h"

namespace splitq::tools {

namespace {

struct Row {
  std::string what;
  int64_t bytes = 0;
  double ms = 0;
};

// The bytes of a config's server part's trainable weights (what a round sums, in float32).
absl::StatusOr<int64_t> ServerPartBytes(const AllreduceBenchOptions& o) {
  auto config = trainer::LoadRunConfig(o.config_path, o.overrides);
  if (!config.ok()) return config.status();
  config->device = "cpu";
  auto part = trainer::ServerPart::Create(*config, "");
  if (!part.ok()) return part.status();
  int64_t bytes = 0;
  for (const at::Tensor& w : (*part)->Weights()) bytes += w.numel() * 4;
  return bytes;
}

}  // namespace

int RunAllreduceBench(const AllreduceBenchOptions& o) {
  const bool cuda = torch::cuda::is_available();
  const std::string backend = o.backend == "auto" ? (cuda ? "nccl" : "gloo") : o.backend;
  if (backend != "gloo" && backend != "nccl") {
    spdlog::error("bench allreduce: --backend {}: auto, gloo or nccl", o.backend);
    return 2;
  }
  const bool on_gpu = backend == "nccl" || (cuda && backend != "gloo");
  if (on_gpu && static_cast<int>(torch::cuda::device_count()) < o.world) {
    spdlog::error("bench allreduce: {} members need {} GPUs; this machine has {}", o.world, o.world,
                  torch::cuda::device_count());
    return 2;
  }
  std::vector<Row> rows;
  for (const double m : o.mib) {
    rows.push_back(Row{absl::StrFormat("%g MiB", m), static_cast<int64_t>(m * (1 << 20)) / 4 * 4});
  }
  if (!o.config_path.empty()) {
    auto bytes = ServerPartBytes(o);
    if (!bytes.ok()) {
      spdlog::error("bench allreduce: --config: {}", bytes.status().ToString());
      return 2;
    }
    rows.push_back(Row{"server part", *bytes});
  }
  auto store = trainer::GroupStore::Start("127.0.0.1", 0, std::chrono::seconds(60));
  if (!store.ok()) {
    spdlog::error("bench allreduce: {}", store.status().ToString());
    return 1;
  }
  std::printf(
      "all-reduce (ReplicaGroup::SumInPlace, float32): %d members, %s on %s, %d sums "
      "per size\n",
      o.world, backend.c_str(), on_gpu ? "CUDA (one GPU each)" : "the CPU (loopback)", o.iters);
  std::vector<std::vector<double>> ms(static_cast<size_t>(o.world),
                                      std::vector<double>(rows.size(), 0));
  std::vector<std::string> errors(static_cast<size_t>(o.world));
  std::vector<std::thread> members;
  for (int rank = 0; rank < o.world; ++rank) {
    members.emplace_back([&, rank] {
      const at::Device device =
          on_gpu ? at::Device(at::kCUDA, static_cast<int8_t>(rank)) : at::Device(at::kCPU);
      trainer::ReplicaGroupOptions g;
      g.backend = backend;
      g.store_port = (*store)->port();
      g.rank = rank;
      g.world = o.world;
      g.generation = 1;
      g.timeout = std::chrono::seconds(60);
      auto group = trainer::ReplicaGroup::Create(g, device);
      if (!group.ok()) {
        errors[static_cast<size_t>(rank)] = group.status().ToString();
        return;
      }
      for (size_t r = 0; r < rows.size(); ++r) {
        at::Tensor t = at::ones({rows[r].bytes / 4}, at::TensorOptions(device).dtype(at::kFloat));
        auto sync = [&] { (void)t.narrow(0, 0, 1).to(at::kCPU); };
        for (int i = 0; i < 3; ++i) (void)(*group)->SumInPlace({t});
        sync();
        if (!(*group)->Max({0}).ok()) return;  // everyone starts together
        const auto start = std::chrono::steady_clock::now();
        for (int i = 0; i < o.iters; ++i) {
          if (absl::Status s = (*group)->SumInPlace({t}); !s.ok()) {
            errors[static_cast<size_t>(rank)] = s.ToString();
            return;
          }
        }
        sync();
        ms[static_cast<size_t>(rank)][r] =
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                .count() /
            o.iters;
      }
    });
  }
  for (std::thread& t : members) t.join();
  for (const std::string& e : errors) {
    if (!e.empty()) {
      spdlog::error("bench allreduce: {}", e);
      return 1;
    }
  }
  std::printf("%-14s %12s %10s %14s %14s\n", "size", "bytes", "ms/sum", "algbw GB/s", "busbw GB/s");
  std::string json =
      absl::StrFormat("{\"backend\": \"%s\", \"world\": %d, \"rows\": [", backend, o.world);
  for (size_t r = 0; r < rows.size(); ++r) {
    double slowest = 0;
    for (const auto& member : ms) slowest = std::max(slowest, member[r]);
    const double algbw = static_cast<double>(rows[r].bytes) / (slowest / 1e3) / 1e9;
    const double busbw = algbw * 2.0 * (o.world - 1) / o.world;
    std::printf("%-14s %12lld %10.3f %14.2f %14.2f\n", rows[r].what.c_str(),
                static_cast<long long>(rows[r].bytes), slowest, algbw, busbw);
    json += absl::StrFormat(
        "%s{\"size\": \"%s\", \"bytes\": %d, \"ms\": %.4f, \"algbw_gb_s\": %.3f, "
        "\"busbw_gb_s\": %.3f}",
        r == 0 ? "" : ", ", rows[r].what, rows[r].bytes, slowest, algbw, busbw);
  }
  json += "]}\n";
  if (!o.json_path.empty()) {
    std::ofstream out(o.json_path);
    out << json;
    if (!out) {
      spdlog::error("bench allreduce: cannot write {}", o.json_path);
      return 1;
    }
  }
  return 0;
}

}  // namespace splitq::tools
