// CUDA path of pack.h: fused quantize+pack and unpack+dequantize.
//
// Channels last (inner == 1, groups >= 32; [N, C] per channel): a block of 32 x 8 threads
// owns a tile of kTileRows = 64 rows x 32*N columns.
//   Quantize+pack (a persistent grid, one wave): thread (tx, ty) loads rows 8ty .. 8ty+7 of
//   its N columns (8 vector loads in flight; the next tile's loads are issued before the
//   current tile is written out), quantizes them and packs each column's 8 codes into that
//   column's k bytes for the run (a 64-bit word), parked in shared memory. The block then
//   writes the words with the threads of a warp on consecutive runs of one column, i.e.
//   consecutive bytes of its segment (k-byte stores: 4-byte at k = 4 when aligned).
//   Unpack+dequantize runs the tile backwards: threads read 8 codes (k bytes) of a column
//   into a shared tile of byte codes, then each thread dequantizes 8 rows of its N columns
//   and stores vectors.
//
// Every other layout (per tensor, per token, NCHW per channel): a block takes a run of
// codes of one group (blocks in chunk-major order); each thread packs 8 consecutive codes
// m .. m+7 into exactly k bytes (vector loads when inner % 8 == 0, else element by element
// in packed order). Unpacking mirrors that when inner % 8 == 0; otherwise each thread
// writes one element of y in memory order and gathers its code's bits.
//
// Stochastic rounding draws u for element e = g * M + m from Philox (philox.h), two or three
// Philox blocks covering any 8 consecutive elements; the codes equal the CPU path's.
#include <algorithm>

#include "kernels/detail/cuda_check.cuh"
#include "kernels/detail/cuda_launchers.h"
#include "kernels/detail/quant_math.h"
#include "kernels/pack.h"
#include "kernels/philox.h"

namespace splitq::kernels::cuda {
namespace {

namespace qm = ::splitq::kernels::detail;

constexpr int kThreads = 256;
constexpr int kTileRows = 64;  // rows of a channels-last tile: two 32-code blocks
constexpr int kRowsPerThread = kTileRows / dev::kClThreadsY;  // 8
static_assert(kRowsPerThread == 8, "a thread handles 8 consecutive rows (k bytes)");

template <typename I>
__device__ __forceinline__ I Min(I a, I b) {
  return a < b ? a : b;
}

__device__ __forceinline__ int64_t SegmentBytes(int64_t codes, int bits) {
  return (codes * bits + 7) / 8;
}

// Uniforms of elements e0 .. e0+7 (philox.h): three Philox blocks cover any 8 consecutive
// elements; the selects keep every register index a compile-time constant.
__device__ __forceinline__ void Uniforms8(uint64_t seed, uint64_t step, uint64_t e0,
                                          float (&u)[8]) {
  const uint64_t b0 = e0 >> 2;
  const uint32_t s = static_cast<uint32_t>(e0 & 3);
  const Philox4 a = PhiloxBlock(seed, step, b0);
  const Philox4 b = PhiloxBlock(seed, step, b0 + 1);
  Philox4 c{};
  if (s != 0) c = PhiloxBlock(seed, step, b0 + 2);  // e0 % 4 == 0: two blocks suffice
  const uint32_t d[12] = {a.v[0], a.v[1], a.v[2], a.v[3], b.v[0], b.v[1],
                          b.v[2], b.v[3], c.v[0], c.v[1], c.v[2], c.v[3]};
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t w = s == 0 ? d[i] : s == 1 ? d[i + 1] : s == 2 ? d[i + 2] : d[i + 3];
    u[i] = PhiloxUniform(w);
  }
}

// Writes the low `nbytes` (1..8) bytes of `word` little-endian at dst, with one wide store
// when the size and alignment allow.
__device__ __forceinline__ void StoreWordBytes(uint8_t* dst, uint64_t word, int nbytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(dst);
  if (nbytes == 4 && (a & 3) == 0) {
    *reinterpret_cast<uint32_t*>(dst) = static_cast<uint32_t>(word);
  } else if (nbytes == 8 && (a & 7) == 0) {
    *reinterpret_cast<uint64_t*>(dst) = word;
  } else if (nbytes == 2 && (a & 1) == 0) {
    *reinterpret_cast<uint16_t*>(dst) = static_cast<uint16_t>(word);
  } else {
    for (int b = 0; b < nbytes; ++b) dst[b] = static_cast<uint8_t>(word >> (8 * b));
  }
}

__device__ __forceinline__ uint64_t LoadWordBytes(const uint8_t* src, int nbytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(src);
  if (nbytes == 4 && (a & 3) == 0) return *reinterpret_cast<const uint32_t*>(src);
  if (nbytes == 8 && (a & 7) == 0) return *reinterpret_cast<const uint64_t*>(src);
  if (nbytes == 2 && (a & 1) == 0) return *reinterpret_cast<const uint16_t*>(src);
  uint64_t word = 0;
  for (int b = 0; b < nbytes; ++b) word |= static_cast<uint64_t>(src[b]) << (8 * b);
  return word;
}

// ---- channels last ----------------------------------------------------------------------

template <int N>
struct ClTile {
  static constexpr int kCols = dev::kClThreadsX * N;
  static constexpr int kStride = kCols + 4;  // bytes per shared code row; +4 spreads banks
};

// Codes of one row of a thread's N columns from the shared tile.
template <int N>
__device__ __forceinline__ void GetCodes(const uint8_t* src, uint32_t (&c)[N]) {
  if constexpr (N == 1) {
    c[0] = src[0];
  } else {
#pragma unroll
    for (int w = 0; w < N / 4; ++w) {
      const uint32_t v = reinterpret_cast<const uint32_t*>(src)[w];
#pragma unroll
      for (int b = 0; b < 4; ++b) c[4 * w + b] = (v >> (8 * b)) & 0xffu;
    }
  }
}

// Grid: x over column tiles, y over row tiles (strided; a persistent grid, see
// LaunchPackCl). Thread (tx, ty) owns columns tx*N .. tx*N+N-1 of the tile and its run
// ty of 8 rows: it turns those 8 codes of a column into the column's k bytes for that run
// (as a 64-bit word) and parks the words in shared memory; the block then writes them out
// with the threads of a warp on consecutive runs of a column, i.e. consecutive bytes of
// its segment (32 contiguous bytes per column and tile at k = 4).
template <typename T, int N, bool kStochastic>
__global__ void __launch_bounds__(dev::kClThreadsX* dev::kClThreadsY, 2)
    PackChannelsLastKernel(const QuantParams p, const int64_t outer, const int64_t groups,
                           const uint64_t seed, const uint64_t step, const T* x,
                           const int64_t* offsets, uint8_t* packed) {
  constexpr int kCols = ClTile<N>::kCols;
  constexpr int kRuns = kTileRows / 8;
  // words[run][j * 32 + tx] holds column tx*N + j's k bytes of that run: the stores of a
  // warp (fixed run and j) are consecutive; the row pad spreads the loads of phase 2
  // (consecutive runs of one column) over the banks.
  constexpr int kRowWords = kCols + 1;
  __shared__ uint64_t words[kRuns * kRowWords];
  __shared__ int64_t seg_offset[kCols];
  __shared__ int seg_bits[kCols];

  const int tid = threadIdx.y * dev::kClThreadsX + threadIdx.x;
  const int64_t col_tile = static_cast<int64_t>(blockIdx.x) * kCols;
  for (int c = tid; c < kCols; c += kThreads) {
    const bool ok = col_tile + c < groups;
    seg_offset[c] = ok ? offsets[col_tile + c] : 0;
    seg_bits[c] = ok ? dev::BitsOf(p, col_tile + c) : 0;
  }
  const int64_t col = col_tile + threadIdx.x * N;
  const bool col_ok = col < groups;
  qm::GroupQuant q[N];
  int bits[N];
#pragma unroll
  for (int j = 0; j < N; ++j) bits[j] = 0;
  if (col_ok) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      q[j] = dev::LoadGroupQuantDevice(p, col + j);
      bits[j] = dev::BitsOf(p, col + j);
    }
  }
  const int64_t tiles = (outer + kTileRows - 1) / kTileRows;
  const int64_t seg_codes = outer;

  // Rows tile*64 + 8*ty .. +7 of this thread's columns. The loads of the next tile are
  // issued before the current tile's write phase, so they stay in flight across it.
  float v[kRowsPerThread][N];
  auto load_tile = [&](int64_t t) {
    const int64_t rb = t * kTileRows + threadIdx.y * kRowsPerThread;
    const T* src = x + rb * groups + col;
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      if (col_ok && rb + i < outer) dev::LoadN<T, N, true>(src + i * groups, v[i]);
    }
  };
  if (blockIdx.y < tiles) load_tile(blockIdx.y);

  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t row0 = tile * kTileRows;
    const int64_t rbase = row0 + threadIdx.y * kRowsPerThread;
    // 1. the k-byte word of each of this thread's columns for run ty.
    uint64_t word[N];
#pragma unroll
    for (int j = 0; j < N; ++j) word[j] = 0;
    if constexpr (kStochastic) {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        float u[8];
        Uniforms8(seed, step, static_cast<uint64_t>((col + j) * outer + rbase), u);
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
          if (rbase + i < outer) {  // rows past the end stay zero (padding)
            word[j] |= static_cast<uint64_t>(qm::StochasticCode(v[i][j], q[j], u[i]))
                       << (i * bits[j]);
          }
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        if (rbase + i < outer) {
#pragma unroll
          for (int j = 0; j < N; ++j) {
            word[j] |= static_cast<uint64_t>(qm::NearestCode(v[i][j], q[j])) << (i * bits[j]);
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < N; ++j) words[threadIdx.y * kRowWords + j * 32 + threadIdx.x] = word[j];
    if (tile + gridDim.y < tiles) load_tile(tile + gridDim.y);
    __syncthreads();

    // 2. run r of column cc: k bytes at byte (row0 / 8 + r) * k of the column's segment.
    for (int item = tid; item < kCols * kRuns; item += kThreads) {
      const int r = item % kRuns, cc = item / kRuns;
      const int k = seg_bits[cc];
      if (k == 0) continue;  // column past the end
      const int64_t seg_len = SegmentBytes(seg_codes, k);
      const int64_t pos = ((row0 >> 3) + r) * k;
      if (pos >= seg_len) continue;
      const uint64_t w = words[r * kRowWords + (cc % N) * 32 + cc / N];
      StoreWordBytes(packed + seg_offset[cc] + pos, w,
                     static_cast<int>(Min<int64_t>(k, seg_len - pos)));
    }
    __syncthreads();
  }
}

template <typename T, int N>
__global__ void __launch_bounds__(dev::kClThreadsX* dev::kClThreadsY)
    UnpackChannelsLastKernel(const QuantParams p, const int64_t outer, const int64_t groups,
                             const uint8_t* packed, const int64_t* offsets, T* y) {
  constexpr int kCols = ClTile<N>::kCols;
  constexpr int kStride = ClTile<N>::kStride;
  constexpr int kRuns = kTileRows / 8;  // runs of 8 codes (k bytes) per column
  __shared__ __align__(16) uint8_t codes[kTileRows * kStride];
  __shared__ int64_t seg_offset[kCols];
  __shared__ int seg_bits[kCols];

  const int tid = threadIdx.y * dev::kClThreadsX + threadIdx.x;
  const int64_t col_tile = static_cast<int64_t>(blockIdx.x) * kCols;
  for (int c = tid; c < kCols; c += kThreads) {
    if (col_tile + c < groups) {
      seg_offset[c] = offsets[col_tile + c];
      seg_bits[c] = dev::BitsOf(p, col_tile + c);
    }
  }
  const int64_t col = col_tile + threadIdx.x * N;
  const bool col_ok = col < groups;
  qm::GroupQuant q[N];
  if (col_ok) {
#pragma unroll
    for (int j = 0; j < N; ++j) q[j] = dev::LoadGroupQuantDevice<false>(p, col + j);
  }
  const int64_t tiles = (outer + kTileRows - 1) / kTileRows;
  __syncthreads();

  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t row0 = tile * kTileRows;
    // 1. run r (codes 8r .. 8r+7 of the tile) of column cc: k bytes -> shared tile.
    for (int item = tid; item < kCols * kRuns; item += kThreads) {
      const int r = item % kRuns, cc = item / kRuns;
      if (col_tile + cc >= groups) continue;
      const int k = seg_bits[cc];
      const int64_t seg_len = SegmentBytes(outer, k);
      const int64_t pos = ((row0 >> 3) + r) * k;
      if (pos >= seg_len) continue;
      const int nbytes = static_cast<int>(Min<int64_t>(k, seg_len - pos));
      const uint64_t word = LoadWordBytes(packed + seg_offset[cc] + pos, nbytes);
      const uint32_t mask = (1u << k) - 1u;
      uint8_t* dst = codes + (r * 8) * kStride + cc;
#pragma unroll
      for (int i = 0; i < 8; ++i) dst[i * kStride] = static_cast<uint8_t>((word >> (i * k)) & mask);
    }
    __syncthreads();
    // 2. rows row0 + 8*ty .. +7 of this thread's columns.
    const int64_t rbase = row0 + threadIdx.y * kRowsPerThread;
    if (col_ok) {
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        if (rbase + i >= outer) break;
        uint32_t c[N];
        GetCodes<N>(codes + (threadIdx.y * kRowsPerThread + i) * kStride + threadIdx.x * N, c);
        float v[N];
#pragma unroll
        for (int j = 0; j < N; ++j) v[j] = qm::DequantCode(c[j], q[j]);
        dev::StoreN<T, N, true>(y + (rbase + i) * groups + col, v);
      }
    }
    __syncthreads();
  }
}

// ---- any layout -------------------------------------------------------------------------

// Element index of code m of group g, and the step to the next code.
struct CodeWalker {
  int64_t e, j;
  __device__ __forceinline__ CodeWalker(int64_t m, int64_t g, int64_t groups, int64_t inner) {
    const int64_t o = m / inner;
    j = m - o * inner;
    e = (o * groups + g) * inner + j;
  }
  __device__ __forceinline__ void Next(int64_t groups, int64_t inner) {
    ++e;
    if (++j == inner) {
      j = 0;
      e += (groups - 1) * inner;
    }
  }
};

// 8 codes starting at code m0 of group g (n <= 8 of them valid). kContiguous: the 8
// elements are contiguous and 16-byte aligned (inner % 8 == 0, aligned base).
template <typename T, bool kContiguous>
__device__ __forceinline__ void LoadRun8(const T* x, int64_t m0, int n, int64_t g, int64_t groups,
                                         int64_t inner, float (&v)[8]) {
  if constexpr (kContiguous) {
    const CodeWalker at(m0, g, groups, inner);
    if constexpr (sizeof(T) == 4) {
      float a[4], b[4];
      dev::LoadN<T, 4>(x + at.e, a);
      dev::LoadN<T, 4>(x + at.e + 4, b);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        v[i] = a[i];
        v[4 + i] = b[i];
      }
    } else {
      dev::LoadN<T, 8>(x + at.e, v);
    }
  } else {
    CodeWalker at(m0, g, groups, inner);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (i < n) {
        v[i] = dev::Elem<T>::Load(x[at.e]);
        at.Next(groups, inner);
      } else {
        v[i] = 0.0f;
      }
    }
  }
}

template <typename T, bool kContiguous>
__device__ __forceinline__ void StoreRun8(T* y, int64_t m0, int n, int64_t g, int64_t groups,
                                          int64_t inner, const float (&v)[8]) {
  if constexpr (kContiguous) {
    const CodeWalker at(m0, g, groups, inner);
    if constexpr (sizeof(T) == 4) {
      const float a[4] = {v[0], v[1], v[2], v[3]}, b[4] = {v[4], v[5], v[6], v[7]};
      dev::StoreN<T, 4>(y + at.e, a);
      dev::StoreN<T, 4>(y + at.e + 4, b);
    } else {
      dev::StoreN<T, 8>(y + at.e, v);
    }
  } else {
    CodeWalker at(m0, g, groups, inner);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (i < n) {
        y[at.e] = dev::Elem<T>::Store(v[i]);
        at.Next(groups, inner);
      }
    }
  }
}

// Grid: units of `codes_per_unit` (a multiple of 8) consecutive codes of one group,
// unit = chunk * groups + g (chunk-major, so that the blocks in flight share sectors of x
// when inner is small); a thread takes runs of 8 codes.
template <typename T, bool kContiguous, bool kStochastic>
__global__ void __launch_bounds__(kThreads)
    PackGenericKernel(const QuantParams p, const int64_t outer, const int64_t groups,
                      const int64_t inner, const int64_t codes_per_unit,
                      const int64_t units_per_group, const uint64_t seed, const uint64_t step,
                      const T* x, const int64_t* offsets, uint8_t* packed) {
  const int64_t codes = outer * inner;
  const int64_t units = groups * units_per_group;
  for (int64_t unit = blockIdx.x; unit < units; unit += gridDim.x) {
    const int64_t chunk = unit / groups;  // chunk-major: concurrent blocks touch nearby x
    const int64_t g = unit - chunk * groups;
    const int64_t m_begin = chunk * codes_per_unit;
    const int64_t m_end = Min(codes, m_begin + codes_per_unit);
    const qm::GroupQuant q = dev::LoadGroupQuantDevice(p, g);
    const int k = dev::BitsOf(p, g);
    uint8_t* seg = packed + offsets[g];
    const int64_t seg_len = SegmentBytes(codes, k);
    for (int64_t m0 = m_begin + static_cast<int64_t>(threadIdx.x) * 8; m0 < m_end;
         m0 += static_cast<int64_t>(blockDim.x) * 8) {
      const int n = static_cast<int>(Min<int64_t>(8, m_end - m0));
      float v[8];
      LoadRun8<T, kContiguous>(x, m0, n, g, groups, inner, v);
      uint64_t word = 0;
      if constexpr (kStochastic) {
        float u[8];
        Uniforms8(seed, step, static_cast<uint64_t>(g * codes + m0), u);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if (i < n) word |= static_cast<uint64_t>(qm::StochasticCode(v[i], q, u[i])) << (i * k);
        }
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if (i < n) word |= static_cast<uint64_t>(qm::NearestCode(v[i], q)) << (i * k);
        }
      }
      const int64_t pos = (m0 >> 3) * k;
      StoreWordBytes(seg + pos, word, static_cast<int>(Min<int64_t>(k, seg_len - pos)));
    }
  }
}

template <typename T, bool kContiguous>
__global__ void __launch_bounds__(kThreads)
    UnpackGenericKernel(const QuantParams p, const int64_t outer, const int64_t groups,
                        const int64_t inner, const int64_t codes_per_unit,
                        const int64_t units_per_group, const uint8_t* packed,
                        const int64_t* offsets, T* y) {
  const int64_t codes = outer * inner;
  const int64_t units = groups * units_per_group;
  for (int64_t unit = blockIdx.x; unit < units; unit += gridDim.x) {
    const int64_t chunk = unit / groups;  // chunk-major: concurrent blocks touch nearby x
    const int64_t g = unit - chunk * groups;
    const int64_t m_begin = chunk * codes_per_unit;
    const int64_t m_end = Min(codes, m_begin + codes_per_unit);
    const qm::GroupQuant q = dev::LoadGroupQuantDevice<false>(p, g);
    const int k = dev::BitsOf(p, g);
    const uint32_t mask = (1u << k) - 1u;
    const uint8_t* seg = packed + offsets[g];
    const int64_t seg_len = SegmentBytes(codes, k);
    for (int64_t m0 = m_begin + static_cast<int64_t>(threadIdx.x) * 8; m0 < m_end;
         m0 += static_cast<int64_t>(blockDim.x) * 8) {
      const int n = static_cast<int>(Min<int64_t>(8, m_end - m0));
      const int64_t pos = (m0 >> 3) * k;
      const uint64_t word =
          LoadWordBytes(seg + pos, static_cast<int>(Min<int64_t>(k, seg_len - pos)));
      float v[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        v[i] = qm::DequantCode(static_cast<uint32_t>(word >> (i * k)) & mask, q);
      }
      StoreRun8<T, kContiguous>(y, m0, n, g, groups, inner, v);
    }
  }
}

// Unpack for layouts whose runs of 8 codes are not contiguous in y (inner % 8 != 0): one
// element of y per thread in memory order (coalesced stores), gathering its code's bits
// (at most 2 bytes) from its group's segment. Index as in fake_quant.cu's flat kernel.
template <typename T, typename Index>
__global__ void __launch_bounds__(kThreads)
    UnpackFlatKernel(const QuantParams p, const Index numel, const Index groups, const Index inner,
                     const uint8_t* packed, const int64_t* offsets, T* y) {
  const Index stride = static_cast<Index>(gridDim.x) * kThreads;
  for (Index e = static_cast<Index>(blockIdx.x) * kThreads + threadIdx.x; e < numel; e += stride) {
    const Index row = e / inner;
    const Index j = e - row * inner;
    const Index o = row / groups;
    const auto g = static_cast<int64_t>(row - o * groups);
    const qm::GroupQuant q = dev::LoadGroupQuantDevice<false>(p, g);
    const int k = dev::BitsOf(p, g);
    const int64_t bit = (static_cast<int64_t>(o) * inner + j) * k;
    const int shift = static_cast<int>(bit & 7);
    const uint8_t* src = packed + offsets[g] + (bit >> 3);
    // A code's bits lie inside its segment, so the second byte exists when needed.
    uint32_t word = src[0];
    if (shift + k > 8) word |= static_cast<uint32_t>(src[1]) << 8;
    const uint32_t code = (word >> shift) & ((1u << k) - 1u);
    y[e] = dev::Elem<T>::Store(qm::DequantCode(code, q));
  }
}

// Block size and run length of the generic kernels: fewer threads for short groups.
struct GenericGrid {
  int threads;
  int64_t codes_per_unit, units_per_group;
  unsigned blocks;
};

GenericGrid MakeGenericGrid(const GroupLayout& l) {
  const int64_t codes = l.per_group();
  const int64_t runs = dev::CeilDiv(codes, 8);
  GenericGrid grid;
  grid.threads = static_cast<int>(std::min<int64_t>(kThreads, dev::CeilDiv(runs, 32) * 32));
  grid.codes_per_unit = static_cast<int64_t>(grid.threads) * 8 * 4;  // 4 runs per thread
  grid.units_per_group = dev::CeilDiv(codes, grid.codes_per_unit);
  grid.blocks =
      static_cast<unsigned>(std::min<int64_t>(l.groups * grid.units_per_group, int64_t{1} << 30));
  return grid;
}

bool UseChannelsLast(const GroupLayout& l) { return l.inner == 1 && l.groups >= dev::kClThreadsX; }

// Persistent grid: one wave of blocks (as many as fit on the device at once), each
// walking row tiles with a stride, so that its prologue is paid once and its loads overlap
// its pack phases.
template <typename T, int N, bool kStochastic>
absl::Status LaunchPackCl(cudaStream_t stream, const GroupLayout& l, const QuantParams& p,
                          const RoundingSpec& r, const T* x, const int64_t* offsets,
                          uint8_t* packed) {
  const auto kernel = PackChannelsLastKernel<T, N, kStochastic>;
  int device = 0, sms = 0, per_sm = 0;
  SPLITQ_CUDA_CHECK(cudaGetDevice(&device));
  SPLITQ_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  SPLITQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  const int64_t tiles = dev::CeilDiv(l.outer, kTileRows);
  const int64_t col_tiles = dev::CeilDiv(l.groups, ClTile<N>::kCols);
  const int64_t slots = std::max<int64_t>(1, static_cast<int64_t>(sms) * std::max(per_sm, 1));
  const int64_t grid_y =
      std::clamp<int64_t>(slots / col_tiles, 1, std::min<int64_t>(tiles, dev::kClMaxGridY));
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(grid_y));
  const dim3 block(dev::kClThreadsX, dev::kClThreadsY);
  kernel<<<grid, block, 0, stream>>>(p, l.outer, l.groups, r.seed, r.step, x, offsets, packed);
  SPLITQ_CUDA_CHECK_LAUNCH("PackChannelsLastKernel");
  return absl::OkStatus();
}

template <typename T, bool kContiguous, bool kStochastic>
void LaunchPackGeneric(cudaStream_t stream, const GroupLayout& l, const QuantParams& p,
                       const RoundingSpec& r, const T* x, const int64_t* offsets, uint8_t* packed) {
  const GenericGrid g = MakeGenericGrid(l);
  PackGenericKernel<T, kContiguous, kStochastic>
      <<<g.blocks, g.threads, 0, stream>>>(p, l.outer, l.groups, l.inner, g.codes_per_unit,
                                           g.units_per_group, r.seed, r.step, x, offsets, packed);
}

template <typename T, bool kStochastic>
absl::Status LaunchPack(cudaStream_t stream, const GroupLayout& l, const QuantParams& p,
                        const RoundingSpec& r, const T* x, const int64_t* offsets,
                        uint8_t* packed) {
  // 4 columns per thread (16-byte loads for fp32, 8-byte for 16-bit types): 8 rows x 8
  // columns of a 16-bit type would cost too many registers.
  constexpr int V = 4;
  if (UseChannelsLast(l)) {
    if (dev::AlignedTo(x, V * sizeof(T)) && l.groups % V == 0) {
      return LaunchPackCl<T, V, kStochastic>(stream, l, p, r, x, offsets, packed);
    }
    return LaunchPackCl<T, 1, kStochastic>(stream, l, p, r, x, offsets, packed);
  }
  if (dev::Aligned16(x) && l.inner % 8 == 0) {
    LaunchPackGeneric<T, true, kStochastic>(stream, l, p, r, x, offsets, packed);
  } else {
    LaunchPackGeneric<T, false, kStochastic>(stream, l, p, r, x, offsets, packed);
  }
  SPLITQ_CUDA_CHECK_LAUNCH("PackGenericKernel");
  return absl::OkStatus();
}

template <typename T>
absl::Status LaunchUnpack(cudaStream_t stream, const GroupLayout& l, const QuantParams& p,
                          const uint8_t* packed, const int64_t* offsets, T* y) {
  constexpr int V = dev::Elem<T>::kVec;
  if (UseChannelsLast(l)) {
    const int64_t tiles = dev::CeilDiv(l.outer, kTileRows);
    const dim3 block(dev::kClThreadsX, dev::kClThreadsY);
    const auto grid_y = static_cast<unsigned>(std::min<int64_t>(tiles, dev::kClMaxGridY));
    if (dev::Aligned16(y) && l.groups % V == 0) {
      const dim3 grid(static_cast<unsigned>(dev::CeilDiv(l.groups, ClTile<V>::kCols)), grid_y);
      UnpackChannelsLastKernel<T, V>
          <<<grid, block, 0, stream>>>(p, l.outer, l.groups, packed, offsets, y);
    } else {
      const dim3 grid(static_cast<unsigned>(dev::CeilDiv(l.groups, ClTile<1>::kCols)), grid_y);
      UnpackChannelsLastKernel<T, 1>
          <<<grid, block, 0, stream>>>(p, l.outer, l.groups, packed, offsets, y);
    }
    SPLITQ_CUDA_CHECK_LAUNCH("UnpackChannelsLastKernel");
    return absl::OkStatus();
  }
  if (l.inner % 8 == 0) {
    const GenericGrid g = MakeGenericGrid(l);
    if (dev::Aligned16(y)) {
      UnpackGenericKernel<T, true><<<g.blocks, g.threads, 0, stream>>>(
          p, l.outer, l.groups, l.inner, g.codes_per_unit, g.units_per_group, packed, offsets, y);
    } else {
      UnpackGenericKernel<T, false><<<g.blocks, g.threads, 0, stream>>>(
          p, l.outer, l.groups, l.inner, g.codes_per_unit, g.units_per_group, packed, offsets, y);
    }
    SPLITQ_CUDA_CHECK_LAUNCH("UnpackGenericKernel");
    return absl::OkStatus();
  }
  const int64_t numel = l.numel();
  const auto blocks =
      static_cast<unsigned>(std::min<int64_t>(dev::CeilDiv(numel, kThreads), 1 << 16));
  if (numel < (int64_t{1} << 31)) {
    UnpackFlatKernel<T, uint32_t><<<blocks, kThreads, 0, stream>>>(
        p, static_cast<uint32_t>(numel), static_cast<uint32_t>(l.groups),
        static_cast<uint32_t>(l.inner), packed, offsets, y);
  } else {
    UnpackFlatKernel<T, uint64_t><<<blocks, kThreads, 0, stream>>>(
        p, static_cast<uint64_t>(numel), static_cast<uint64_t>(l.groups),
        static_cast<uint64_t>(l.inner), packed, offsets, y);
  }
  SPLITQ_CUDA_CHECK_LAUNCH("UnpackFlatKernel");
  return absl::OkStatus();
}

}  // namespace

absl::Status QuantizePack(void* stream, DType dtype, const GroupLayout& layout,
                          const QuantParams& params, const RoundingSpec& rounding, const void* x,
                          const int64_t* group_offsets, uint8_t* packed, int64_t packed_bytes) {
  (void)packed_bytes;  // the caller checked it against group_offsets; the kernel trusts it
  if (layout.numel() == 0) return absl::OkStatus();
  const auto s = static_cast<cudaStream_t>(stream);
  return dev::DispatchDeviceDType(dtype, [&](auto tag) -> absl::Status {
    using T = decltype(tag);
    const T* xt = static_cast<const T*>(x);
    return rounding.mode == Rounding::kStochastic
               ? LaunchPack<T, true>(s, layout, params, rounding, xt, group_offsets, packed)
               : LaunchPack<T, false>(s, layout, params, rounding, xt, group_offsets, packed);
  });
}

absl::Status UnpackDequantize(void* stream, DType dtype, const GroupLayout& layout,
                              const QuantParams& params, const uint8_t* packed,
                              int64_t packed_bytes, const int64_t* group_offsets, void* y) {
  (void)packed_bytes;
  if (layout.numel() == 0) return absl::OkStatus();
  const auto s = static_cast<cudaStream_t>(stream);
  return dev::DispatchDeviceDType(dtype, [&](auto tag) -> absl::Status {
    using T = decltype(tag);
    return LaunchUnpack<T>(s, layout, params, packed, group_offsets, static_cast<T*>(y));
  });
}

}  // namespace splitq::kernels::cuda
