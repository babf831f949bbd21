#include "tools/allreduce_bench.h"

#include <spdlog/spdlog.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <thread>

#include "absl/strings/str_format.h"
#include "trainer/boundary.h"
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

// Member `rank` of a group of `world` at this process's store (one GPU each on CUDA).
absl::StatusOr<std::unique_ptr<trainer::ReplicaGroup>> JoinMember(const std::string& backend,
                                                                  int store_port, int rank,
                                                                  int world, bool on_gpu) {
  trainer::ReplicaGroupOptions g;
  g.backend = backend;
  g.store_port = store_port;
  g.rank = rank;
  g.world = world;
  g.generation = 1;
  g.timeout = std::chrono::seconds(120);
  return trainer::ReplicaGroup::Create(
      g, on_gpu ? at::Device(at::kCUDA, static_cast<int8_t>(rank)) : at::Device(at::kCPU));
}

// Writes `json` to `path` ("" : nowhere); the exit code.
int WriteJson(const std::string& path, const std::string& json) {
  if (path.empty()) return 0;
  std::ofstream out(path);
  out << json;
  if (!out) {
    spdlog::error("bench allreduce: cannot write {}", path);
    return 1;
  }
  return 0;
}

// --rounds: whole rounds of the config's server part, one variant per bucket size.
int RunRoundBench(const AllreduceBenchOptions& o, const std::string& backend, bool on_gpu) {
  std::vector<std::string> overrides = o.overrides;
  overrides.push_back("quant.activations.mode=fp32");
  overrides.push_back("quant.gradients.mode=fp32");
  auto config = trainer::LoadRunConfig(o.config_path, overrides);
  if (!config.ok()) {
    spdlog::error("bench allreduce: --config: {}", config.status().ToString());
    return 2;
  }
  if (config->u_shaped) {
    spdlog::error("bench allreduce: --rounds: worker groups serve the plain layout only");
    return 2;
  }
  const int64_t batch = o.round_batch > 0 ? o.round_batch : config->batch_size;
  auto store = trainer::GroupStore::Start("127.0.0.1", 0, std::chrono::seconds(60));
  if (!store.ok()) {
    spdlog::error("bench allreduce: {}", store.status().ToString());
    return 1;
  }
  const size_t variants = o.bucket_kib.size();
  std::vector<std::vector<double>> ms(static_cast<size_t>(o.world), std::vector<double>(variants));
  std::vector<std::vector<double>> sum_ms = ms;
  std::vector<std::vector<int>> buckets(static_cast<size_t>(o.world), std::vector<int>(variants));
  std::vector<std::string> errors(static_cast<size_t>(o.world));
  std::vector<std::thread> members;
  for (int rank = 0; rank < o.world; ++rank) {
    members.emplace_back([&, rank] {
      const size_t me = static_cast<size_t>(rank);
      auto group = JoinMember(backend, (*store)->port(), rank, o.world, on_gpu);
      if (!group.ok()) {
        errors[me] = group.status().ToString();
        return;
      }
      std::vector<std::unique_ptr<trainer::ServerPart>> parts;
      for (const int64_t kib : o.bucket_kib) {
        trainer::RunConfig c = *config;
        c.device = on_gpu ? absl::StrFormat("cuda:%d", rank) : "cpu";
        c.group_bucket_kib = kib;
        trainer::ServerPartOptions po;
        po.max_batch = batch;
        torch::manual_seed(0);
        auto part = trainer::ServerPart::Create(c, "", po);
        if (!part.ok()) {
          errors[me] = part.status().ToString();
          return;
        }
        (*part)->set_group(group->get());
        parts.push_back(std::move(*part));
      }
      // One random batch per member, the same for every variant.
      std::vector<int64_t> shape{batch};
      for (int64_t d : parts[0]->input_shape()) shape.push_back(d);
      torch::manual_seed(static_cast<uint64_t>(rank) + 1);
      const at::Tensor h = torch::randn(shape);
      const int64_t targets =
          config->task == trainer::Task::kLanguageModel ? batch * shape[1] : batch;
      trainer::UpFrame up;
      up.frame = std::make_shared<const std::string>(trainer::internal::EncodeRawTensor(h));
      up.labels.assign(static_cast<size_t>(targets), 1);
      std::vector<uint64_t> sessions;
      for (auto& part : parts) sessions.push_back(part->OpenSession());
      for (int round = -2; round < o.rounds; ++round) {
        up.step = round + 3;
        for (size_t v = 0; v < variants; ++v) {
          const double before = parts[v]->round_times().sum_ms;
          const auto start = std::chrono::steady_clock::now();
          for (const auto& r : parts[v]->TrainMerged({{sessions[v], &up}})) {
            if (!r.ok()) {
              errors[me] = r.status().ToString();
              return;
            }
          }
          if (on_gpu) torch::cuda::synchronize(rank);
          if (round < 0) continue;
          ms[me][v] +=
              std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                  .count() /
              o.rounds;
          sum_ms[me][v] += (parts[v]->round_times().sum_ms - before) / o.rounds;
        }
      }
      for (auto& part : parts) part->set_group(nullptr);
    });
  }
  for (std::thread& t : members) t.join();
  for (const std::string& e : errors) {
    if (!e.empty()) {
      spdlog::error("bench allreduce: {}", e);
      return 1;
    }
  }
  std::printf(
      "group rounds (%s): %d members, %s on %s, %lld examples per member per round, %d "
      "rounds per variant, variants taking turns\n",
      o.config_path.c_str(), o.world, backend.c_str(),
      on_gpu ? "CUDA (one GPU each)" : "the CPU (loopback)", static_cast<long long>(batch),
      o.rounds);
  std::printf("%-12s %12s %14s %12s\n", "bucket_kib", "ms/round", "ms in the sum", "vs 0");
  std::string json = absl::StrFormat(
      "{\"backend\": \"%s\", \"world\": %d, \"batch\": %d, \"rounds\": [", backend, o.world, batch);
  double base = 0;
  for (size_t v = 0; v < variants; ++v) {
    double slowest = 0, waited = 0;
    for (size_t m = 0; m < ms.size(); ++m) {
      if (ms[m][v] > slowest) {
        slowest = ms[m][v];
        waited = sum_ms[m][v];
      }
    }
    if (o.bucket_kib[v] == 0) base = slowest;
    std::printf("%-12lld %12.2f %14.2f %12s\n", static_cast<long long>(o.bucket_kib[v]), slowest,
                waited, base > 0 ? absl::StrFormat("%.3f", slowest / base).c_str() : "-");
    json += absl::StrFormat("%s{\"bucket_kib\": %d, \"ms\": %.3f, \"sum_ms\": %.3f}",
                            v == 0 ? "" : ", ", o.bucket_kib[v], slowest, waited);
  }
  json += "]}\n";
  return WriteJson(o.json_path, json);
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
  if (o.rounds > 0) {
    if (o.config_path.empty()) {
      spdlog::error("bench allreduce: --rounds needs --config (whose server part to train)");
      return 2;
    }
    return RunRoundBench(o, backend, on_gpu);
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
      auto group = JoinMember(backend, (*store)->port(), rank, o.world, on_gpu);
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
  return WriteJson(o.json_path, json);
}

}  // namespace splitq::tools
