// `splitq bench kernels`: our kernels, PyTorch's ops of the same shape and a plain copy
// (the bandwidth limit), measured side by side in one run. After 3 warm-up calls, each
// figure is the mean of --iters calls on CUDA and the median of --iters calls on the CPU
// (see TimeMs).
// GB/s counts bytes read plus bytes written (10^9 bytes per second).
//
// Cases: kernels/op_table.h's PerfCases(device), named OP:SHAPE:DTYPE[:bBITS], each with
// the copy of its own shape and dtype as the bandwidth limit ("% of copy"):
//   copy          out.copy_(x) into a preallocated tensor
//   fake_quant    8-bit signed per channel; torch: fake_quantize_per_channel_affine
//   lsq           learned step, forward + backward (grads of x and scale);
//                 torch: _fake_quantize_learnable_per_channel_affine
//   pack/unpack   min-max quantize+pack and back (b4, and b3-5: mixed widths per channel);
//                 torch (b4): the same written with plain tensor ops, two codes per byte
//   pack_sr       4-bit pack with stochastic rounding (ours only)
// plus, on the CPU, encode_1thread / decode_1thread: the whole wire (pack + CRC32C; validate
// + CRC + unpack) on one core. A PyTorch op that refuses a dtype leaves its column empty.
// --json writes each case with its op, shape, axis, dtype and bits, which
// scripts/kernel-anchors.py reads to time PyTorch eager and torch.compile on the same cases.
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
  std::string filter;  // only the cases whose name contains it (empty: all)
  int iters = 0;       // 0: 20 on CUDA, 9 on the CPU
};

// Runs it; returns the process exit code (errors are logged).
int RunKernelBench(const KernelBenchOptions& options);

}  // namespace splitq::tools
