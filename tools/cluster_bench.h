// splitq tools: `splitq bench cluster` (below): a worker's aggregate throughput with N clients.
//
// `splitq bench cluster --config F [--set k=v ...] [--clients 1,4,8,16] [--steps S] [--warmup W]
// [--merge K] [--window-ms W] [--merge-threads T,...] [--json FILE]`: for each client count N, a
// worker (the real WorkerCore and WorkerService on 127.0.0.1, plaintext gRPC) and N clients
// (ClientPart and the real WorkerClient link, one thread each, all in this process) train the
// config; after W warm-up steps per client the clients start together and run S steps each. Each N
// runs twice, side by side: one step at a time (server.merge.max_clients 1) and merged (K clients,
// default N; window W ms, default the config's; once per --merge-threads value, with the
// worker's merged-round phases per round). Then one process (ClientPart + ServerPart
// joined in memory, `splitq train`'s step) at the merged batch N x batch_size, the ceiling
// merging aims at. Prints aggregate samples/s (examples, not tokens), each client's ms/step,
// the clients per server update, and the ratios; the worker's compute is one thread as in
// `splitq worker`. Clients in one process share its CPU or GPU with the worker: on a CPU-only
// machine with few cores, they compete for the same cores, which a real cluster would not.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace splitq::tools {

struct ClusterBenchOptions {
  std::string config_path;
  std::vector<std::string> overrides;
  std::string init;
  std::vector<int> clients{1, 4, 8, 16};
  int steps = 20;
  int warmup = 3;
  int merge = 0;          // clients per merged batch (0: N, the clients of the row)
  double window_ms = -1;  // -1: the config's server.merge.window_ms
  // A merged run per entry, with server.merge.threads set to it (empty: the config's).
  std::vector<int64_t> merge_threads;
  std::string json_path;
};

// Runs it; returns the process exit code (errors are logged).
int RunClusterBench(const ClusterBenchOptions& options);

}  // namespace splitq::tools
