// CUDA path of lsq_backward.h.
//
// One pass over x and grad_y writes grad_x and per-block partial sums into the workspace;
// a second small kernel adds the partials of each group in a fixed order (in double). No
// atomics: the result depends only on the layout, never on scheduling.
//
// Paths (chosen from the layout alone, so that the workspace size is known up front):
//  * channels last (inner == 1, groups >= 32): blocks of 32 x 8 threads over a tile of
//    32*N columns x R rows (R = ChannelsLastRowsPerBlock). Each thread owns N consecutive
//    columns (16-byte vectors when aligned), loads their constants once, walks its rows with
//    several loads in flight and keeps per-column sums in registers; the block adds its 8
//    row-slices in order and writes partial[row_block][2][groups].
//  * group major (everything else): a block handles kChunk consecutive codes m of one group
//    (element ((m / inner) * groups + g) * inner + m % inner, contiguous runs when inner is
//    large), reduces in a fixed tree and writes partial[g * chunks + c][2].
#include <algorithm>

#include "kernels/detail/cuda_check.cuh"
#include "kernels/detail/cuda_launchers.h"
#include "kernels/detail/quant_math.h"
#include "kernels/lsq_backward.h"

namespace splitq::kernels::cuda {
namespace {

namespace qm = ::splitq::kernels::detail;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Codes of one group handled by one block of the group-major path.
constexpr int64_t kChunk = 8192;
// Evict-first cache hints measured slightly slower here (95% vs 97% of copy bandwidth).
constexpr bool kStream = false;

template <typename I>
__device__ __forceinline__ I Min(I a, I b) {
  return a < b ? a : b;
}

bool UseChannelsLast(const GroupLayout& l) { return l.inner == 1 && l.groups >= dev::kClThreadsX; }

int64_t RowBlocks(const GroupLayout& l) {
  return dev::CeilDiv(l.outer, dev::ChannelsLastRowsPerBlock(l.outer, l.groups));
}

int64_t ChunksPerGroup(const GroupLayout& l) { return dev::CeilDiv(l.per_group(), kChunk); }

template <typename T, int N>
__global__ void __launch_bounds__(dev::kClThreadsX* dev::kClThreadsY)
    LsqChannelsLastKernel(const QuantParams p, const int64_t outer, const int64_t groups,
                          const int64_t rows_per_block, const T* x, const T* dy, T* dx,
                          float* partial) {
  constexpr int kCols = dev::kClThreadsX * N;
  constexpr int kStep = dev::kClThreadsY;
  constexpr int kU = N >= 8 ? 2 : 4;  // loads in flight per thread, per input
  __shared__ float red[2][dev::kClThreadsY][kCols];

  const int64_t col = (static_cast<int64_t>(blockIdx.x) * dev::kClThreadsX + threadIdx.x) * N;
  float sum_s[N], sum_b[N];
#pragma unroll
  for (int i = 0; i < N; ++i) sum_s[i] = sum_b[i] = 0.0f;

  if (col < groups) {
    qm::GroupQuant q[N];
#pragma unroll
    for (int i = 0; i < N; ++i) q[i] = dev::LoadGroupQuantDevice(p, col + i);
    const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
    const int64_t row_end = Min(outer, row_begin + rows_per_block);
    int64_t r = row_begin + threadIdx.y;
    // grad_x may alias grad_y: each batch loads all its rows before storing any.
    for (; r + (kU - 1) * kStep < row_end; r += kU * kStep) {
      float xv[kU][N], gv[kU][N];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int64_t e = (r + u * kStep) * groups + col;
        dev::LoadN<T, N, kStream>(x + e, xv[u]);
        dev::LoadN<T, N, kStream>(dy + e, gv[u]);
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
#pragma unroll
        for (int i = 0; i < N; ++i) {
          const qm::LsqGrad g = qm::LsqElementGrad(xv[u][i], gv[u][i], q[i]);
          gv[u][i] = g.dx;
          sum_s[i] += g.dscale;
          sum_b[i] += g.doffset;
        }
        dev::StoreN<T, N, kStream>(dx + (r + u * kStep) * groups + col, gv[u]);
      }
    }
    for (; r < row_end; r += kStep) {
      float xv[N], gv[N];
      dev::LoadN<T, N, kStream>(x + r * groups + col, xv);
      dev::LoadN<T, N, kStream>(dy + r * groups + col, gv);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const qm::LsqGrad g = qm::LsqElementGrad(xv[i], gv[i], q[i]);
        gv[i] = g.dx;
        sum_s[i] += g.dscale;
        sum_b[i] += g.doffset;
      }
      dev::StoreN<T, N, kStream>(dx + r * groups + col, gv);
    }
  }

#pragma unroll
  for (int i = 0; i < N; ++i) {
    red[0][threadIdx.y][threadIdx.x * N + i] = sum_s[i];
    red[1][threadIdx.y][threadIdx.x * N + i] = sum_b[i];
  }
  __syncthreads();
  const int tid = threadIdx.y * dev::kClThreadsX + threadIdx.x;
  for (int t = tid; t < 2 * kCols; t += dev::kClThreadsX * dev::kClThreadsY) {
    const int which = t / kCols, c = t % kCols;
    const int64_t g = static_cast<int64_t>(blockIdx.x) * kCols + c;
    if (g >= groups) continue;
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < dev::kClThreadsY; ++k) s += red[which][k][c];
    partial[(static_cast<int64_t>(blockIdx.y) * 2 + which) * groups + g] = s;
  }
}

// Sum of `v` over the block in a fixed order; the result is valid in thread 0.
__device__ __forceinline__ float BlockSum(float v, float* smem /* [kWarps] */) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += smem[w];
  }
  __syncthreads();
  return total;
}

// Element index of code m of group g (pack.h's order).
__device__ __forceinline__ int64_t ElementIndex(int64_t m, int64_t g, int64_t groups, int64_t inner,
                                                bool narrow) {
  int64_t o, j;
  if (narrow) {
    const uint32_t mm = static_cast<uint32_t>(m), in = static_cast<uint32_t>(inner);
    const uint32_t oo = mm / in;
    o = oo;
    j = mm - oo * in;
  } else {
    o = m / inner;
    j = m - o * inner;
  }
  return (o * groups + g) * inner + j;
}

// N > 1 needs inner % N == 0 (so runs of N codes are contiguous) and aligned pointers.
template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    LsqGroupMajorKernel(const QuantParams p, const int64_t outer, const int64_t groups,
                        const int64_t inner, const int64_t chunks_per_group, const T* x,
                        const T* dy, T* dx, float* partial) {
  constexpr int kU = N >= 8 ? 2 : 4;  // loads in flight per thread, per input
  __shared__ float red[2][kWarps];
  const int64_t codes = outer * inner;
  const bool narrow = codes <= int64_t{0xffffffff};
  const int64_t units = groups * chunks_per_group;
  for (int64_t unit = blockIdx.x; unit < units; unit += gridDim.x) {
    // Chunk-major block order: with a small inner the blocks in flight cover neighbouring
    // elements of all groups, so partial sectors of grad_x merge in L2.
    const int64_t c = unit / groups;
    const int64_t g = unit - c * groups;
    const int64_t m_begin = c * kChunk;
    const int64_t m_end = Min(codes, m_begin + kChunk);
    const qm::GroupQuant q = dev::LoadGroupQuantDevice(p, g);
    float sum_s = 0.0f, sum_b = 0.0f;
    for (int64_t m0 = m_begin + static_cast<int64_t>(threadIdx.x) * N; m0 < m_end;
         m0 += static_cast<int64_t>(kThreads) * N * kU) {
      float xv[kU][N], gv[kU][N];
      int64_t e[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int64_t m = m0 + static_cast<int64_t>(u) * kThreads * N;
        e[u] = m < m_end ? ElementIndex(m, g, groups, inner, narrow) : -1;
        if (e[u] >= 0) {
          dev::LoadN<T, N>(x + e[u], xv[u]);
          dev::LoadN<T, N>(dy + e[u], gv[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        if (e[u] < 0) continue;
#pragma unroll
        for (int i = 0; i < N; ++i) {
          const qm::LsqGrad gr = qm::LsqElementGrad(xv[u][i], gv[u][i], q);
          gv[u][i] = gr.dx;
          sum_s += gr.dscale;
          sum_b += gr.doffset;
        }
        dev::StoreN<T, N>(dx + e[u], gv[u]);
      }
    }
    sum_s = BlockSum(sum_s, red[0]);
    sum_b = BlockSum(sum_b, red[1]);
    if (threadIdx.x == 0) {
      partial[2 * (g * chunks_per_group + c)] = sum_s;
      partial[2 * (g * chunks_per_group + c) + 1] = sum_b;
    }
  }
}

// partial[(i * 2 + which) * groups + g], i < n: blocks of 32 groups x 8 slices of i.
__global__ void __launch_bounds__(dev::kClThreadsX* dev::kClThreadsY)
    FinalizeRowBlocksKernel(const float* partial, const int64_t groups, const int64_t n,
                            float* grad_scale_sum, float* grad_offset_sum) {
  __shared__ double red[2][dev::kClThreadsY][dev::kClThreadsX];
  const int64_t g = static_cast<int64_t>(blockIdx.x) * dev::kClThreadsX + threadIdx.x;
  double s = 0.0, b = 0.0;
  if (g < groups) {
    const int64_t i0 = n * threadIdx.y / dev::kClThreadsY;
    const int64_t i1 = n * (threadIdx.y + 1) / dev::kClThreadsY;
#pragma unroll 4
    for (int64_t i = i0; i < i1; ++i) {
      s += static_cast<double>(partial[(2 * i) * groups + g]);
      b += static_cast<double>(partial[(2 * i + 1) * groups + g]);
    }
  }
  red[0][threadIdx.y][threadIdx.x] = s;
  red[1][threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0 && g < groups) {
    double ts = 0.0, tb = 0.0;
#pragma unroll
    for (int k = 0; k < dev::kClThreadsY; ++k) {
      ts += red[0][k][threadIdx.x];
      tb += red[1][k][threadIdx.x];
    }
    grad_scale_sum[g] = static_cast<float>(ts);
    if (grad_offset_sum != nullptr) grad_offset_sum[g] = static_cast<float>(tb);
  }
}

// partial[(g * n + i) * 2 + which]: one warp per group, lanes stride over i, then a fixed
// shuffle tree.
__global__ void __launch_bounds__(kThreads)
    FinalizeGroupMajorKernel(const float* partial, const int64_t groups, const int64_t n,
                             float* grad_scale_sum, float* grad_offset_sum) {
  const int lane = threadIdx.x & 31;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (g >= groups) return;  // whole warps leave together
  const float* base = partial + 2 * g * n;
  double s = 0.0, b = 0.0;
  for (int64_t i = lane; i < n; i += 32) {
    s += static_cast<double>(base[2 * i]);
    b += static_cast<double>(base[2 * i + 1]);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    s += __shfl_down_sync(0xffffffffu, s, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
  }
  if (lane == 0) {
    grad_scale_sum[g] = static_cast<float>(s);
    if (grad_offset_sum != nullptr) grad_offset_sum[g] = static_cast<float>(b);
  }
}

template <typename T>
absl::Status Launch(cudaStream_t stream, const GroupLayout& l, const QuantParams& p, const T* x,
                    const T* dy, T* dx, float* grad_scale_sum, float* grad_offset_sum,
                    float* partial) {
  constexpr int V = dev::Elem<T>::kVec;
  const bool aligned = dev::Aligned16(x) && dev::Aligned16(dy) && dev::Aligned16(dx);

  if (UseChannelsLast(l)) {
    const int64_t rows_per_block = dev::ChannelsLastRowsPerBlock(l.outer, l.groups);
    const int64_t row_blocks = RowBlocks(l);
    const dim3 block(dev::kClThreadsX, dev::kClThreadsY);
    if (aligned && l.groups % V == 0) {
      const dim3 grid(static_cast<unsigned>(dev::CeilDiv(l.groups, dev::kClThreadsX * V)),
                      static_cast<unsigned>(row_blocks));
      LsqChannelsLastKernel<T, V>
          <<<grid, block, 0, stream>>>(p, l.outer, l.groups, rows_per_block, x, dy, dx, partial);
    } else {
      const dim3 grid(static_cast<unsigned>(dev::CeilDiv(l.groups, dev::kClThreadsX)),
                      static_cast<unsigned>(row_blocks));
      LsqChannelsLastKernel<T, 1>
          <<<grid, block, 0, stream>>>(p, l.outer, l.groups, rows_per_block, x, dy, dx, partial);
    }
    SPLITQ_CUDA_CHECK_LAUNCH("LsqChannelsLastKernel");
    FinalizeRowBlocksKernel<<<static_cast<unsigned>(dev::CeilDiv(l.groups, dev::kClThreadsX)),
                              block, 0, stream>>>(partial, l.groups, row_blocks, grad_scale_sum,
                                                  grad_offset_sum);
    SPLITQ_CUDA_CHECK_LAUNCH("FinalizeRowBlocksKernel");
    return absl::OkStatus();
  }

  const int64_t chunks = ChunksPerGroup(l);
  const int64_t units = l.groups * chunks;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>(units, int64_t{1} << 30));
  if (aligned && l.inner % V == 0) {
    LsqGroupMajorKernel<T, V><<<blocks, kThreads, 0, stream>>>(p, l.outer, l.groups, l.inner,
                                                               chunks, x, dy, dx, partial);
  } else {
    LsqGroupMajorKernel<T, 1><<<blocks, kThreads, 0, stream>>>(p, l.outer, l.groups, l.inner,
                                                               chunks, x, dy, dx, partial);
  }
  SPLITQ_CUDA_CHECK_LAUNCH("LsqGroupMajorKernel");
  const auto fin_blocks =
      static_cast<unsigned>(std::min<int64_t>(dev::CeilDiv(l.groups, kWarps), int64_t{1} << 30));
  FinalizeGroupMajorKernel<<<fin_blocks, kThreads, 0, stream>>>(partial, l.groups, chunks,
                                                                grad_scale_sum, grad_offset_sum);
  SPLITQ_CUDA_CHECK_LAUNCH("FinalizeGroupMajorKernel");
  return absl::OkStatus();
}

}  // namespace

size_t LsqBackwardWorkspaceBytes(const GroupLayout& layout) {
  if (layout.numel() <= 0) return 0;
  const int64_t entries = UseChannelsLast(layout) ? RowBlocks(layout) * layout.groups
                                                  : layout.groups * ChunksPerGroup(layout);
  return static_cast<size_t>(2 * entries) * sizeof(float);
}

absl::Status LsqBackward(void* stream_ptr, DType dtype, const GroupLayout& layout,
                         const QuantParams& params, const void* x, const void* grad_y, void* grad_x,
                         float* grad_scale_sum, float* grad_offset_sum, void* workspace,
                         size_t workspace_bytes) {
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (layout.groups <= 0) return absl::OkStatus();
  if (layout.numel() == 0) {
    // No elements: the sums are zero (as on the CPU path).
    SPLITQ_CUDA_CHECK(cudaMemsetAsync(grad_scale_sum, 0, layout.groups * sizeof(float), stream));
    if (grad_offset_sum != nullptr) {
      SPLITQ_CUDA_CHECK(cudaMemsetAsync(grad_offset_sum, 0, layout.groups * sizeof(float), stream));
    }
    return absl::OkStatus();
  }
  const size_t needed = LsqBackwardWorkspaceBytes(layout);
  if (workspace_bytes < needed || (needed > 0 && workspace == nullptr)) {
    return absl::InvalidArgumentError("workspace is smaller than LsqBackwardWorkspaceBytes()");
  }
  if ((reinterpret_cast<uintptr_t>(workspace) & (alignof(float) - 1)) != 0) {
    return absl::InvalidArgumentError("workspace must be 4-byte aligned");
  }
  return dev::DispatchDeviceDType(dtype, [&](auto tag) -> absl::Status {
    using T = decltype(tag);
    return Launch<T>(stream, layout, params, static_cast<const T*>(x),
                     static_cast<const T*>(grad_y), static_cast<T*>(grad_x), grad_scale_sum,
                     grad_offset_sum, static_cast<float*>(workspace));
  });
}

}  // namespace splitq::kernels::cuda
