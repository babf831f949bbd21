// CUDA path of rotate.h: the randomized Hadamard rotation along channels.
//
// Two kernels, chosen on the host from the layout:
//  * channels last (inner == 1, any block 2..1024): the tensor is taken as a flat run of
//    blocks (a block never straddles a row, since block divides the channel count). A warp
//    owns 32 x E consecutive elements, E = max(16 bytes of elements, block / 32) per lane and
//    contiguous, loaded with 16-byte accesses. The butterflies of the passes h < E stay in a
//    lane's registers; the passes E <= h < block pair lane l with lane l ^ (h / E) through a
//    shuffle. One pass is one add or subtract an element, the passes in the order the CPU path
//    runs them (h = 1, 2, 4, ...), so the values are the CPU's bit for bit;
//  * strided (inner > 1, block <= 64): a thread owns one inner position of one block of
//    channels, its `block` values (stride inner) in registers; threads run along inner, so
//    each load is coalesced.
// x and y may be the same memory (each element is read and then written by one thread, so they
// are not __restrict__). Signs come from a bit table in device memory (RotationSignBits);
// multiplying by +-1 and by
// +-1/sqrt(block) is done as the CPU does it (the sign times the factor), so it is exact.
#include <algorithm>
#include <cmath>

#include "kernels/detail/cuda_check.cuh"
#include "kernels/detail/cuda_launchers.h"
#include "kernels/rotate.h"

namespace splitq::kernels::cuda {
namespace {

constexpr int kWarps = 8;  // a block of 256 threads
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float SignOf(const uint32_t* bits, int64_t c) {
  return ((__ldg(bits + (c >> 5)) >> (c & 31)) & 1u) != 0 ? -1.0f : 1.0f;
}

// The butterfly passes h = 1, 2, 4, ... below min(N, limit) among one thread's N values.
template <int N>
__device__ __forceinline__ void ButterfliesInRegisters(float (&v)[N], int limit) {
#pragma unroll
  for (int h = 1; h < N; h <<= 1) {
    if (h >= limit) break;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if ((k & h) == 0) {
        const float a = v[k], b = v[k + h];
        v[k] = a + b;
        v[k + h] = a - b;
      }
    }
  }
}

// Channels last. E elements a lane; `block` a power of two in 2..32 * E (so a block spans at
// most the warp). `aligned`: channels % E == 0 (a lane's E elements are channels c0..c0+E-1 of
// one row, their signs one shift of one word) and every lane's run is whole.
template <typename T, int E>
__global__ void __launch_bounds__(kWarps * 32)
    RotateChannelsLastKernel(const T* x, T* y, int64_t numel, int64_t channels, int block,
                             const uint32_t* __restrict__ sign_bits, bool inverse, float norm,
                             bool aligned) {
  constexpr int kVec = 16 / sizeof(T) < E ? 16 / sizeof(T) : E;  // elements per access
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kWarps) + (threadIdx.x >> 5);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  const int64_t segments = (numel + 32 * E - 1) / (32 * E);
  for (int64_t seg = warp; seg < segments; seg += warps) {
    const int64_t base = seg * (32 * E) + static_cast<int64_t>(lane) * E;
    float v[E];
    float s[E];
    const bool whole = aligned && base + E <= numel;
    if (whole) {
#pragma unroll
      for (int k = 0; k < E; k += kVec) {
        float part[kVec];
        dev::LoadN<T, kVec, true>(x + base + k, part);
#pragma unroll
        for (int i = 0; i < kVec; ++i) v[k + i] = part[i];
      }
      const int64_t c0 = base % channels;
      // E <= 32 and c0 % E == 0: the E bits sit in one word.
      const uint32_t word = __ldg(sign_bits + (c0 >> 5)) >> (c0 & 31);
#pragma unroll
      for (int k = 0; k < E; ++k) s[k] = ((word >> k) & 1u) != 0 ? -1.0f : 1.0f;
    } else {
#pragma unroll
      for (int k = 0; k < E; ++k) {
        const int64_t i = base + k;
        v[k] = i < numel ? dev::Elem<T>::Load(x[i]) : 0.0f;
        s[k] = i < numel ? SignOf(sign_bits, i % channels) : 1.0f;
      }
    }
    if (!inverse) {
#pragma unroll
      for (int k = 0; k < E; ++k) v[k] *= s[k];
    }
    ButterfliesInRegisters(v, block);  // the passes inside a lane
    // Passes across lanes: the lower lane of a pair keeps a + b, the upper one a - b.
    for (int h = E; h < block; h <<= 1) {
      const int mask = h / E;
      const bool upper = (lane & mask) != 0;
#pragma unroll
      for (int k = 0; k < E; ++k) {
        const float other = __shfl_xor_sync(kFull, v[k], mask);
        v[k] = upper ? other - v[k] : v[k] + other;
      }
    }
#pragma unroll
    for (int k = 0; k < E; ++k) v[k] *= inverse ? s[k] * norm : norm;
    if (whole) {
#pragma unroll
      for (int k = 0; k < E; k += kVec) {
        float part[kVec];
#pragma unroll
        for (int i = 0; i < kVec; ++i) part[i] = v[k + i];
        dev::StoreN<T, kVec, true>(y + base + k, part);
      }
    } else {
#pragma unroll
      for (int k = 0; k < E; ++k) {
        if (base + k < numel) y[base + k] = dev::Elem<T>::Store(v[k]);
      }
    }
  }
}

// inner > 1: a thread per (outer, channel block, inner position), B values in registers.
template <typename T, int B>
__global__ void __launch_bounds__(kWarps * 32)
    RotateStridedKernel(const T* x, T* y, int64_t outer, int64_t channels, int64_t inner,
                        const uint32_t* __restrict__ sign_bits, bool inverse, float norm) {
  const int64_t blocks = channels / B;
  const int64_t columns = outer * blocks * inner;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < columns;
       t += stride) {
    const int64_t p = t % inner;
    const int64_t ob = t / inner;  // outer * blocks + block
    const int64_t c0 = (ob % blocks) * B;
    const int64_t o = ob / blocks;
    const T* src = x + (o * channels + c0) * inner + p;
    T* dst = y + (o * channels + c0) * inner + p;
    float v[B];
#pragma unroll
    for (int k = 0; k < B; ++k) v[k] = dev::Elem<T>::Load(src[k * inner]);
    if (!inverse) {
#pragma unroll
      for (int k = 0; k < B; ++k) v[k] *= SignOf(sign_bits, c0 + k);
    }
    ButterfliesInRegisters(v, B);
#pragma unroll
    for (int k = 0; k < B; ++k) {
      v[k] *= inverse ? SignOf(sign_bits, c0 + k) * norm : norm;
      dst[k * inner] = dev::Elem<T>::Store(v[k]);
    }
  }
}

int GridFor(int64_t work_items, int per_block) {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) {
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  const int64_t want = (work_items + per_block - 1) / per_block;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, int64_t{sms} * 16)));
}

template <typename T, int E>
absl::Status LaunchChannelsLast(cudaStream_t stream, const GroupLayout& layout, int block,
                                const uint32_t* sign_bits, bool inverse, float norm, const void* x,
                                void* y) {
  const int64_t numel = layout.numel();
  const bool aligned = layout.groups % E == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(y) % 16 == 0;
  const int64_t segments = (numel + 32 * E - 1) / (32 * E);
  RotateChannelsLastKernel<T, E><<<GridFor(segments, kWarps), kWarps * 32, 0, stream>>>(
      static_cast<const T*>(x), static_cast<T*>(y), numel, layout.groups, block, sign_bits, inverse,
      norm, aligned);
  SPLITQ_CUDA_CHECK_LAUNCH("RotateChannelsLastKernel");
  return absl::OkStatus();
}

template <typename T, int B>
absl::Status LaunchStrided(cudaStream_t stream, const GroupLayout& layout,
                           const uint32_t* sign_bits, bool inverse, float norm, const void* x,
                           void* y) {
  const int64_t columns = layout.outer * (layout.groups / B) * layout.inner;
  RotateStridedKernel<T, B><<<GridFor(columns, kWarps * 32), kWarps * 32, 0, stream>>>(
      static_cast<const T*>(x), static_cast<T*>(y), layout.outer, layout.groups, layout.inner,
      sign_bits, inverse, norm);
  SPLITQ_CUDA_CHECK_LAUNCH("RotateStridedKernel");
  return absl::OkStatus();
}

// LaunchStrided<T, block>, for block in B, 2B, ..., 64.
template <typename T, int B>
absl::Status LaunchStridedFor(cudaStream_t stream, const GroupLayout& layout, int block,
                              const uint32_t* sign_bits, bool inverse, float norm, const void* x,
                              void* y) {
  if (block == B) return LaunchStrided<T, B>(stream, layout, sign_bits, inverse, norm, x, y);
  if constexpr (B < 64) {
    return LaunchStridedFor<T, 2 * B>(stream, layout, block, sign_bits, inverse, norm, x, y);
  }
  return absl::UnimplementedError("RotateChannels on CUDA: inner > 1 takes blocks up to 64");
}

template <typename T>
absl::Status RotateTyped(cudaStream_t stream, const GroupLayout& layout, int block,
                         const uint32_t* sign_bits, bool inverse, const void* x, void* y) {
  const float norm = 1.0f / std::sqrt(static_cast<float>(block));
  if (layout.inner == 1) {
    constexpr int kMinE = 16 / sizeof(T);  // one 16-byte access a lane
    const int e = std::max(kMinE, block / 32);
    switch (e) {
      case 4:
        if constexpr (kMinE <= 4) {
          return LaunchChannelsLast<T, 4>(stream, layout, block, sign_bits, inverse, norm, x, y);
        }
        break;
      case 8:
        return LaunchChannelsLast<T, 8>(stream, layout, block, sign_bits, inverse, norm, x, y);
      case 16:
        return LaunchChannelsLast<T, 16>(stream, layout, block, sign_bits, inverse, norm, x, y);
      case 32:
        return LaunchChannelsLast<T, 32>(stream, layout, block, sign_bits, inverse, norm, x, y);
      default:
        break;
    }
    return absl::InternalError("RotateChannels: no channels-last kernel for this block");
  }
  return LaunchStridedFor<T, 1>(stream, layout, block, sign_bits, inverse, norm, x, y);
}

}  // namespace

absl::Status RotateChannels(void* stream, DType dtype, const GroupLayout& layout, int64_t block,
                            const uint32_t* sign_bits, bool inverse, const void* x, void* y) {
  auto s = static_cast<cudaStream_t>(stream);
  const int b = static_cast<int>(block);
  switch (dtype) {
    case DType::kFloat32:
      return RotateTyped<float>(s, layout, b, sign_bits, inverse, x, y);
    case DType::kBFloat16:
      return RotateTyped<__nv_bfloat16>(s, layout, b, sign_bits, inverse, x, y);
    case DType::kFloat16:
      return RotateTyped<__half>(s, layout, b, sign_bits, inverse, x, y);
  }
  return absl::InvalidArgumentError("RotateChannels: unknown dtype");
}

}  // namespace splitq::kernels::cuda
