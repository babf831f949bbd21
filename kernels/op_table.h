// splitq kernels: one table of cases (ops x shapes x dtypes x bit widths) for the
// correctness tests and the benchmarks, as ggml's test-backend-ops keeps one.
//
//   - tests/kernels/cuda_vs_cpu_test.cc sweeps TestShapes() x TestBits() x every DType x
//     signedness through each op (CUDA against the CPU path, bit for bit), and PerfShapes()
//     at the widths the benchmark times;
//   - `splitq bench kernels` times PerfCases(device) (ours, PyTorch's op where one exists, and
//     a copy of the same shape and dtype) and writes each case's name, op, shape and dtype
//     into its --json output;
//   - scripts/kernel-anchors.py reads that JSON and times the same cases with PyTorch eager and
//     torch.compile, so that the two join by name.
//
// A case's name is OP:SHAPE:DTYPE[:bBITS], e.g. "unpack:nc_16384x4096:float32:b4" or
// "pack:nchw_256x64x32x32:bfloat16:b3-5" (mixed widths 3..5, one per channel, seeded); a
// rotation's is OP:SHAPE:DTYPE:rBLOCK, e.g. "rotate:nc_16384x4096:float32:r256".
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "kernels/common.h"

namespace splitq::kernels {

// A tensor shape and how it is grouped (MakeGroupLayout's arguments), with a name.
struct ShapeCase {
  std::string name;
  std::vector<int64_t> shape;
  Granularity granularity = Granularity::kChannel;
  int axis = 1;

  int64_t numel() const;
};

// The sweep of the correctness tests: per tensor, per channel ([N, C], NCHW, weights on axis
// 0), per token; empty, tiny, odd and tail-heavy sizes. Small enough for a CPU reference.
std::vector<ShapeCase> TestShapes();
// Larger channels-last shapes (the persistent pack grid walks several row tiles per block).
std::vector<ShapeCase> LargeTestShapes();
// Bit widths of the sweep: 2..8 uniform, and 0 = mixed 1..8 per group.
std::vector<int> TestBits();

enum class KernelOp : uint8_t {
  kCopy = 0,        // out.copy_(x) into a preallocated tensor: the bandwidth limit
  kFakeQuant,       // per-channel fake-quant, 8-bit signed
  kLsq,             // learned per-channel step (LSQ), forward + backward, 8-bit signed
  kPack,            // min-max quantize + pack
  kPackStochastic,  // the same with stochastic rounding (the gradient's wire)
  kUnpack,          // unpack + dequantize
  kRotate,          // the randomized Hadamard rotation along channels (kernels/rotate.h)
};

// "copy", "fake_quant", "lsq", "pack", "pack_sr", "unpack", "rotate".
const char* KernelOpName(KernelOp op);

// One benchmark case. bits: 1..8 uniform, or 0 for mixed widths mixed_lo..mixed_hi (one per
// group, from std::mt19937(1)); ignored by kCopy and kRotate. block: kRotate's block of
// channels (named :rBLOCK instead of :bBITS).
struct KernelCase {
  KernelOp op = KernelOp::kCopy;
  ShapeCase shape;
  DType dtype = DType::kFloat32;
  int bits = 8;
  int mixed_lo = 3, mixed_hi = 5;
  int block = 0;

  // OP:SHAPE:DTYPE[:bBITS] (see the banner).
  std::string Name() const;
  // Bytes read plus bytes written by one call (GB/s and "% of copy" use it); packed bytes at
  // the mean width for mixed cases.
  double Bytes() const;
  // Per-group widths of a mixed case (seeded; empty for uniform cases).
  std::vector<uint8_t> MixedBits(int64_t groups) const;
};

// Shapes the benchmark times on `device`: on CUDA [16384, 4096] per channel (fp32, bf16, fp16),
// NCHW [256, 64, 32, 32] and [8192, 64, 7, 7] per channel (fp32, bf16); on the CPU [4096, 4096]
// and [64, 64, 32, 32] (fp32).
std::vector<KernelCase> PerfCases(Device device);
// The distinct shapes of PerfCases(device), with the dtypes each is timed in.
std::vector<std::pair<ShapeCase, std::vector<DType>>> PerfShapes(Device device);

}  // namespace splitq::kernels
