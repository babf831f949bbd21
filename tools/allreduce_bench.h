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
};

// Runs it; returns the process exit code (errors are logged).
int RunAllreduceBench(const AllreduceBenchOptions& options);

}  // namespace splitq::tools
