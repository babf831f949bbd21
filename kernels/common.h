// splitq kernels: the types every kernel's host API shares.
//
// Kernels take raw pointers, a layout, quantizer parameters and an execution context
// (device + stream). They know nothing of torch, never allocate device memory (scratch space
// is passed in, sized by a *WorkspaceBytes() query; the CPU paths use O(groups) host scratch
// for per-group tables) and report errors as absl::Status.
//
// Validation: every path checks the layout, pointers and uniform bits on the host. Per-group
// bit arrays are checked on the CPU paths; on CUDA they live in device memory and are
// trusted (the callers that build them, quant::ProjectBits and PackedOffsets, validate
// them), as is packed_bytes, which the caller computed with PackedOffsets. Each op is a header
// (host API) plus a .cc (CPU path) and a .cu (CUDA path) behind the same function.
//
// The quantizer every kernel implements (design.md, "Quantizers"), per group g:
//   inv_s = 1 / s_g                                  (float, computed once per group)
//   v     = (x - beta_g) * inv_s                      (float, no fused multiply-add)
//   r     = rint(v)                                   (round half to even)
//   q     = clamp(r + z_g, qmin_g, qmax_g)            (integer code)
//   x_hat = (q - z_g) * s_g + beta_g
// where beta is an offset in x units (LSQ+, AMAQ; 0 when absent), z is an integer-valued
// zero point in code units (affine / PyTorch style; 0 when absent) and
//   signed codes:   qmin = -2^(k-1), qmax = 2^(k-1) - 1
//   unsigned codes: qmin = 0,        qmax = 2^k - 1
// with k the group's bit width (1..8). With beta = 0 this is exactly PyTorch's
// fake_quantize_per_channel_affine (which also multiplies by 1/s rather than dividing).
// NaN inputs give NaN outputs in fake-quant; on the wire a NaN encodes as code qmin.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "base/status_macros.h"

#if defined(__CUDACC__)
#define SPLITQ_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SPLITQ_HOST_DEVICE inline
#endif

namespace splitq::kernels {

// Element types a kernel reads and writes. Arithmetic is always fp32 inside.
enum class DType : uint8_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Size of one element of `dtype`, in bytes.
size_t DTypeSize(DType dtype);
// "float32", "bfloat16" or "float16".
const char* DTypeName(DType dtype);

enum class Device : uint8_t { kCpu = 0, kCuda = 1 };

// Where and how a kernel runs. For kCuda every pointer handed to the kernel is device
// memory and `stream` is a cudaStream_t (nullptr: the legacy default stream). For kCpu
// pointers are host memory and `cpu_threads` caps the OpenMP team (0: OpenMP's default).
struct ExecContext {
  Device device = Device::kCpu;
  void* stream = nullptr;
  int cpu_threads = 0;
};

// True when the CUDA paths were compiled in (nvcc was found at build time).
bool CudaKernelsBuilt();

// How elements map to quantization groups: a tensor is viewed as [outer, groups, inner]
// in row-major order, and element i belongs to group (i / inner) % groups.
//   per tensor:                      outer = 1,            groups = 1,     inner = numel
//   per channel on axis a:           outer = prod(d[:a]),  groups = d[a],  inner = prod(d[a+1:])
//   per token (rows of the last dim): outer = 1,           groups = numel / d[-1], inner = d[-1]
struct GroupLayout {
  int64_t outer = 0;
  int64_t groups = 0;
  int64_t inner = 0;

  int64_t numel() const { return outer * groups * inner; }
  // Elements that share one group's parameters.
  int64_t per_group() const { return outer * inner; }
};

enum class Granularity : uint8_t { kTensor = 0, kChannel = 1, kToken = 2 };

// Builds the layout for `shape` at `granularity` (`axis` is used for kChannel only and may
// be negative, Python style). Errors: negative dims, axis out of range, element count
// overflowing int64, a zero-dimensional shape with per-channel or per-token granularity.
absl::StatusOr<GroupLayout> MakeGroupLayout(absl::Span<const int64_t> shape,
                                            Granularity granularity, int axis);

// Parameters of the quantizer above, one entry per group. All arrays live on the
// kernel's device. `scale` is required and must be positive and finite; the kernels do not
// check it per element (the callers do, once).
struct QuantParams {
  const float* scale = nullptr;       // [groups] step size s, in x units
  const float* offset = nullptr;      // [groups] beta, in x units; nullptr means 0
  const float* zero_point = nullptr;  // [groups] z, integer-valued, code units; nullptr: 0
  const uint8_t* bits = nullptr;      // [groups] k in 1..8; nullptr: `uniform_bits` for all
  int uniform_bits = 8;               // k for every group when `bits` is nullptr
  bool is_signed = false;             // signed or unsigned code range (see banner)
};

// Host-side check of the parts of QuantParams that do not need reading device memory.
absl::Status ValidateQuantParams(const QuantParams& params, const GroupLayout& layout);

// Code range for `bits` (1..8).
SPLITQ_HOST_DEVICE int32_t QMin(int bits, bool is_signed) {
  return is_signed ? -(1 << (bits - 1)) : 0;
}
SPLITQ_HOST_DEVICE int32_t QMax(int bits, bool is_signed) {
  return is_signed ? (1 << (bits - 1)) - 1 : (1 << bits) - 1;
}

}  // namespace splitq::kernels
