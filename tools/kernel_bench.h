// `splitq bench kernels`: our kernels, PyTorch's ops of the same shape and a plain copy
// (the bandwidth limit), measured side by side in one run. After 3 warm-up calls, each
// figure is the mean of --iters calls on CUDA and the median of --iters calls on the CPU
// (see TimeMs).
// GB/s counts bytes read plus bytes written (10^9 bytes per second).
//
// Cases (fp32 [rows, cols], channels on axis 1):
//   copy                          out.copy_(x) into a preallocated tensor (bandwidth limit)
//   fake_quant_per_channel        8-bit signed; torch: fake_quantize_per_channel_affine
//   lsq_per_channel_fwd_bwd       learned step, forward + backward (grads of x and scale);
//                                 torch: _fake_quantize_learnable_per_channel_affine
//   pack_4bit / unpack_4bit       quantize+pack to 4 bits and back; torch: the same written
//                                 with plain tensor ops (two codes per byte)
//   pack_mixed_3to5bit            mixed per-channel widths 3..5 (ours only)
//   encode_4bit_1thread (CPU)     the whole wire encode (pack + CRC32C) on one core
//   decode_4bit_1thread (CPU)     validate + CRC + unpack on one core
// splitq tools: `splitq bench kernels` (below).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace splitq::tools {

struct KernelBenchOptions {
  std::string device = "cpu";
  std::string json_path;
  int64_t rows = 0;  // 0: 16384 on CUDA, 4096 on the CPU
  int64_t cols = 4096;
  int iters = 0;  // 0: 20 on CUDA, 9 on the CPU
};

// Runs it; returns the process exit code (errors are logged).
int RunKernelBench(const KernelBenchOptions& options);

}  // namespace splitq::tools
