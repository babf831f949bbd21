// splitq kernels (internal, CUDA only): error reporting for the launchers, plus the few
// device helpers the .cu files share (element conversion, 16-byte vector access, dtype
// dispatch, alignment checks).
//
// Launchers never throw and never allocate: every CUDA call and every kernel launch goes
// through SPLITQ_CUDA_CHECK / SPLITQ_CUDA_CHECK_LAUNCH, which turn a cudaError_t into an
// absl::InternalError naming the call or kernel, file:line and the host.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <unistd.h>

#include <cstdint>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/common.h"
#include "kernels/detail/quant_math.h"

namespace splitq::kernels::cuda {

// OK for cudaSuccess, else InternalError("CUDA error in <what> at <file>:<line> on host
// <host>: <name> (<description>)").
inline absl::Status CudaStatus(cudaError_t err, const char* what, const char* file, int line) {
  if (err == cudaSuccess) return absl::OkStatus();
  char host[256] = "unknown";
  if (gethostname(host, sizeof(host)) != 0) host[0] = '\0';
  host[sizeof(host) - 1] = '\0';
  return absl::InternalError(absl::StrCat("CUDA error in ", what, " at ", file, ":", line,
                                          " on host ", host, ": ", cudaGetErrorName(err), " (",
                                          cudaGetErrorString(err), ")"));
}

}  // namespace splitq::kernels::cuda

// Returns an InternalError from the enclosing function when the CUDA runtime call fails.
#define SPLITQ_CUDA_CHECK(call) \
  SPLITQ_RETURN_IF_ERROR(::splitq::kernels::cuda::CudaStatus((call), #call, __FILE__, __LINE__))

// After a kernel launch: returns an InternalError naming `kernel_name` when the launch
// failed (bad configuration, no kernel image for the device, an earlier sticky error).
#define SPLITQ_CUDA_CHECK_LAUNCH(kernel_name)                 \
  SPLITQ_RETURN_IF_ERROR(::splitq::kernels::cuda::CudaStatus( \
      cudaGetLastError(), "kernel launch " kernel_name, __FILE__, __LINE__))

namespace splitq::kernels::cuda::dev {

// ---- elements -------------------------------------------------------------------------
// Load/Store convert between the storage type and the fp32 arithmetic (round to nearest
// even, as the CPU's host_dtype.h does). kVec elements make one 16-byte access.
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kVec = 4;
  __device__ __forceinline__ static float Load(float v) { return v; }
  __device__ __forceinline__ static float Store(float v) { return v; }
};

template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float Load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 Store(float v) { return __float2bfloat16_rn(v); }
};

template <>
struct Elem<__half> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float Load(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half Store(float v) { return __float2half_rn(v); }
};

// Raw 16-bit patterns <-> fp32 (used on the unpacked halves of a 16-byte vector).
template <typename T>
__device__ __forceinline__ float FromBits16(uint32_t bits);
template <>
__device__ __forceinline__ float FromBits16<__nv_bfloat16>(uint32_t bits) {
  return __uint_as_float(bits << 16);
}
template <>
__device__ __forceinline__ float FromBits16<__half>(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}
template <typename T>
__device__ __forceinline__ uint32_t ToBits16(float v);
template <>
__device__ __forceinline__ uint32_t ToBits16<__nv_bfloat16>(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
template <>
__device__ __forceinline__ uint32_t ToBits16<__half>(float v) {
  return __half_as_ushort(__float2half_rn(v));
}

// Raw storage of N elements of T loaded or stored as one access (2 to 16 bytes).
template <int kBytes>
struct RawVec;
template <>
struct RawVec<2> {
  using Type = uint16_t;
};
template <>
struct RawVec<4> {
  using Type = uint32_t;
};
template <>
struct RawVec<8> {
  using Type = uint2;
};
template <>
struct RawVec<16> {
  using Type = uint4;
};

template <typename R>
__device__ __forceinline__ void RawToWords(const R& r, uint32_t* w) {
  if constexpr (std::is_same_v<R, uint16_t> || std::is_same_v<R, uint32_t>) {
    w[0] = r;
  } else if constexpr (std::is_same_v<R, uint2>) {
    w[0] = r.x;
    w[1] = r.y;
  } else {
    w[0] = r.x;
    w[1] = r.y;
    w[2] = r.z;
    w[3] = r.w;
  }
}
template <typename R>
__device__ __forceinline__ R WordsToRaw(const uint32_t* w) {
  if constexpr (std::is_same_v<R, uint16_t>) {
    return static_cast<uint16_t>(w[0]);
  } else if constexpr (std::is_same_v<R, uint32_t>) {
    return w[0];
  } else if constexpr (std::is_same_v<R, uint2>) {
    return make_uint2(w[0], w[1]);
  } else {
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// N consecutive elements at p to fp32, as one access of N * sizeof(T) bytes (p must be
// aligned to that size; N * sizeof(T) <= 16, a power of two).
// kStream: evict-first cache hint (ld.global.cs / st.global.cs) for data touched once;
// on an H100 it lifts a channels-last stream from ~80% to ~95% of copy bandwidth.
template <typename R, bool kStream>
__device__ __forceinline__ R LoadRaw(const R* p) {
  if constexpr (kStream) {
    return __ldcs(p);
  } else {
    return *p;
  }
}
template <typename R, bool kStream>
__device__ __forceinline__ void StoreRaw(R* p, const R& v) {
  if constexpr (kStream) {
    __stcs(p, v);
  } else {
    *p = v;
  }
}

template <typename T, int N, bool kStream = false>
__device__ __forceinline__ void LoadN(const T* p, float (&out)[N]) {
  static_assert(N * sizeof(T) <= 16 && (N & (N - 1)) == 0, "one access of at most 16 bytes");
  if constexpr (N == 1) {
    if constexpr (std::is_same_v<T, float>) {
      out[0] = LoadRaw<float, kStream>(p);
    } else {
      out[0] = FromBits16<T>(
          LoadRaw<unsigned short, kStream>(reinterpret_cast<const unsigned short*>(p)));
    }
  } else {
    using R = typename RawVec<N * sizeof(T)>::Type;
    constexpr int kWords = N * sizeof(T) / 4;
    uint32_t w[kWords];
    RawToWords(LoadRaw<R, kStream>(reinterpret_cast<const R*>(p)), w);
#pragma unroll
    for (int i = 0; i < kWords; ++i) {
      if constexpr (std::is_same_v<T, float>) {
        out[i] = __uint_as_float(w[i]);
      } else {
        out[2 * i] = FromBits16<T>(w[i] & 0xffffu);
        out[2 * i + 1] = FromBits16<T>(w[i] >> 16);
      }
    }
  }
}

template <typename T, int N, bool kStream = false>
__device__ __forceinline__ void StoreN(T* p, const float (&in)[N]) {
  static_assert(N * sizeof(T) <= 16 && (N & (N - 1)) == 0, "one access of at most 16 bytes");
  if constexpr (N == 1) {
    if constexpr (std::is_same_v<T, float>) {
      StoreRaw<float, kStream>(p, in[0]);
    } else {
      StoreRaw<unsigned short, kStream>(reinterpret_cast<unsigned short*>(p),
                                        static_cast<unsigned short>(ToBits16<T>(in[0])));
    }
  } else {
    using R = typename RawVec<N * sizeof(T)>::Type;
    constexpr int kWords = N * sizeof(T) / 4;
    uint32_t w[kWords];
#pragma unroll
    for (int i = 0; i < kWords; ++i) {
      if constexpr (std::is_same_v<T, float>) {
        w[i] = __float_as_uint(in[i]);
      } else {
        w[i] = ToBits16<T>(in[2 * i]) | (ToBits16<T>(in[2 * i + 1]) << 16);
      }
    }
    StoreRaw<R, kStream>(reinterpret_cast<R*>(p), WordsToRaw<R>(w));
  }
}

// ---- group constants ------------------------------------------------------------------
// Device twin of detail::LoadGroupQuant (quant_math.h), operation for operation. That one
// calls QMin/QMax from common.h, which are host-only functions, so it cannot run on the
// device; this copy spells the same float operations with round-to-nearest intrinsics.
// kInverse = false leaves inv_scale at 0 (dequantization does not use it) and saves the
// division.
template <bool kInverse = true>
__device__ __forceinline__ ::splitq::kernels::detail::GroupQuant LoadGroupQuantDevice(
    const QuantParams& p, int64_t g) {
  const int bits = p.bits != nullptr ? p.bits[g] : p.uniform_bits;
  const float z = p.zero_point != nullptr ? p.zero_point[g] : 0.0f;
  const int32_t qmin = p.is_signed ? -(1 << (bits - 1)) : 0;
  const int32_t qmax = p.is_signed ? (1 << (bits - 1)) - 1 : (1 << bits) - 1;
  ::splitq::kernels::detail::GroupQuant q;
  q.scale = p.scale[g];
  q.inv_scale = kInverse ? __frcp_rn(q.scale) : 0.0f;  // correctly rounded, as 1.0f / s
  q.offset = p.offset != nullptr ? p.offset[g] : 0.0f;
  q.lo = __fsub_rn(static_cast<float>(qmin), z);
  q.hi = __fsub_rn(static_cast<float>(qmax), z);
  return q;
}

__device__ __forceinline__ int BitsOf(const QuantParams& p, int64_t g) {
  return p.bits != nullptr ? p.bits[g] : p.uniform_bits;
}

// ---- host helpers ---------------------------------------------------------------------
inline bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
inline bool AlignedTo(const void* p, size_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

// Calls fn(T{}) with T the device storage type of `dtype`; returns fn's Status.
template <typename Fn>
absl::Status DispatchDeviceDType(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      return fn(float{});
    case DType::kBFloat16:
      return fn(__nv_bfloat16{});
    case DType::kFloat16:
      return fn(__half{});
  }
  return absl::InvalidArgumentError("unknown dtype");
}

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Channels-last kernels (inner == 1) run blocks of kClThreadsX x kClThreadsY threads: x over
// columns (groups), y over rows (outer). A block covers kClThreadsX * vector-width columns
// and ChannelsLastRowsPerBlock() rows. The row split depends on the layout alone (never on
// the dtype or the device) because LsqBackward's workspace holds one partial sum per row
// block and group, and its size is asked for without a dtype.
constexpr int kClThreadsX = 32;
constexpr int kClThreadsY = 8;
constexpr int64_t kClMaxGridY = 65535;

inline int64_t ChannelsLastRowsPerBlock(int64_t outer, int64_t groups, int64_t max_rows = 128) {
  const int64_t col_blocks = CeilDiv(groups, kClThreadsX * 4);
  int64_t rows = max_rows;  // 128: 16 rows per thread
  while (rows > kClThreadsY && col_blocks * CeilDiv(outer, rows) < 2048) rows /= 2;
  const int64_t min_rows = CeilDiv(CeilDiv(outer, kClMaxGridY), kClThreadsY) * kClThreadsY;
  return rows > min_rows ? rows : min_rows;
}

}  // namespace splitq::kernels::cuda::dev
