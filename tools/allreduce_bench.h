// splitq tools: `splitq bench allreduce`: what one server update's gradient sum costs in a
// worker group, measured with the group's own code (trainer/replica_group.h, SumInPlace: the
// flat buffer, the c10d all-reduce, the copy back).
//
// `splitq bench allreduce [--backend auto|gloo|nccl] [--world N] [--mib M]... [--config F
// [--set k=v]...] [--iters K] [--json FILE]`: N members, one thread each in this process (on
// CUDA: member i on GPU i, so N GPUs are needed; on the CPU: gloo over loopback), meet in a
// store this process serves and sum float32 buffers of each size (--mib, and with --config the
// size of that config's server part's trainable weights: exactly what a round sums). After 3
// unmeasured sums, K timed sums per size; the time per sum is the slowest member's mean.
// Printed per size: ms per sum, algorithm bandwidth (bytes / time) and bus bandwidth (bytes x
// 2(N-1)/N / time, NCCL's convention: comparable across N; 0 for one member).
//
// `--rounds K --config F [--bucket-kib B]...`: whole group rounds instead, what an update of
// the config's server part costs with each server.group.bucket_kib (0: one sum after the
// backward pass; B > 0: buckets that start during it). Each member holds one server part per
// B (fp32 boundaries, equal weights), all in the same group, and feeds each the same random
// batch of --round-batch examples (default: the config's batch_size) per round; the variants
// take turns round by round, so each sees the same load. After 2 unmeasured rounds each, K
// timed rounds per variant; printed per variant: ms per round (the slowest member's mean),
// the part of it spent waiting in the sum (RoundTimes::sum_ms), and the ratio to B = 0.
#pragma once

#include <string>
#include <vector>

namespace splitq::tools {

struct AllreduceBenchOptions {
  std::string backend = "auto";  // auto: nccl when CUDA is there, gloo otherwise
  int world = 2;
  std::vector<double> mib{1, 16, 64};
  std::string config_path;  // "" : no server-part size
  std::vector<std::string> overrides;
  int iters = 20;
  std::string json_path;
  int rounds = 0;                            // > 0: time whole rounds (needs config_path)
  std::vector<int64_t> bucket_kib{0, 1024};  // the variants of --rounds
  int64_t round_batch = 0;                   // examples per member per round (0: batch_size)
};

// Runs it; returns the process exit code (errors are logged).
int RunAllreduceBench(const AllreduceBenchOptions& options);

}  // namespace splitq::tools
