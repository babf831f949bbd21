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
//   and stores vectors. For 16-bit outputs a thread instead loads the codes of its 4
//   columns x 32 rows straight into registers (4k contiguous bytes per column), widens them
//   to a byte per code and stores 32 rows of 8 bytes (faster there; not for fp32, where the
//   shared tile measured faster).
//
// Every other layout (per tensor, per token, NCHW per channel): a block takes a run of
// codes of one group (blocks in chunk-major order); each thread packs 8 consecutive codes
// m .. m+7 into exactly k bytes (vector loads when inner % 8 == 0, else element by element
// in packed order). Unpacking mirrors that when inner % 8 == 0; otherwise (inner <= 2048)
// a block stages a tile of 8 outer rows' codes in shared memory in y's order and writes y
// with vector stores (UnpackStagedKernel), or, for longer rows, each thread writes 8
// consecutive elements of y in memory order and gathers their codes' bits. (UnpackRunsKernel,
// opt-in and not yet run on a GPU, reads rows of 8 or more by aligned words instead.)
//
// Stochastic rounding draws u for element e = g * M + m from Philox (philox.h), two or three
// Philox blocks covering any 8 consecutive elements; the codes equal the CPU path's.
#include <algorithm>
#include <cstdlib>
#include <limits>
#include <numeric>

#include "absl/status/statusor.h"
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

// ---- integer codes without conversion instructions -----------------------------------
// With no zero point (every wire frame), lo = qmin and hi = qmax are small integers. Adding
// M = 1.5 * 2^23 to a float |v| < 2^22 rounds it to an integer, ties to even as rintf does,
// and leaves that integer in the low mantissa bits. So, with base = bits(M + lo),
//   NearestCode: rint(clamp(v)) - lo == bits(clamp(v) + M) - base,
//   DequantCode: float(code) + lo    == float(bits base + code) - M,
// exactly, with an add and an integer add where quant_math.h rounds and converts between
// float and int (conversions issue at a quarter of the rate of adds on sm_80 and sm_90).
// kFast = false keeps quant_math.h's operations (any integer zero point).
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23

template <bool kFast>
struct Codes {
  __device__ __forceinline__ static uint32_t Base(const qm::GroupQuant& q) {
    if constexpr (kFast) return __float_as_uint(__fadd_rn(kRoundMagic, q.lo));
    return 0u;
  }
  __device__ __forceinline__ static uint32_t Nearest(float x, const qm::GroupQuant& q,
                                                     uint32_t base) {
    if constexpr (kFast) {
      float v = __fmul_rn(__fsub_rn(x, q.offset), q.inv_scale);
      v = fminf(fmaxf(v, q.lo), q.hi);  // fmaxf(NaN, lo) = lo: NaN gives code 0, as there
      return __float_as_uint(__fadd_rn(v, kRoundMagic)) - base;
    } else {
      return qm::NearestCode(x, q);
    }
  }
  __device__ __forceinline__ static float Dequant(uint32_t code, const qm::GroupQuant& q,
                                                  uint32_t base) {
    if constexpr (kFast) {
      const float lifted = __fsub_rn(__uint_as_float(base + code), kRoundMagic);
      return __fadd_rn(__fmul_rn(lifted, q.scale), q.offset);
    } else {
      return qm::DequantCode(code, q);
    }
  }
};

// Packs code i (0..7) of a run of 8 into two 32-bit halves (4 codes of at most 8 bits
// each), which cost fewer instructions than shifts of a 64-bit word.
struct RunWord {
  uint32_t lo = 0, hi = 0;
  __device__ __forceinline__ void Put(int i, uint32_t code, int bits) {
    if (i < 4) {
      lo |= code << (i * bits);
    } else {
      hi |= code << ((i - 4) * bits);
    }
  }
  __device__ __forceinline__ uint64_t Word(int bits) const {
    return lo | (static_cast<uint64_t>(hi) << (4 * bits));
  }
};

// One row of a thread's N columns as loaded: the raw bits (16-bit types stay packed two to
// a register until quantized, so that 8 rows x 8 columns fit in registers).
template <typename T, int N>
struct RawRow {
  uint32_t w[(N * sizeof(T) + 3) / 4];
};

template <typename T, int N>
__device__ __forceinline__ void LoadRawRow(const T* p, RawRow<T, N>& r) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  if constexpr (kBytes >= 4) {
    using R = typename dev::RawVec<kBytes>::Type;
    dev::RawToWords(dev::LoadRaw<R, true>(reinterpret_cast<const R*>(p)), r.w);
  } else {
    r.w[0] = dev::LoadRaw<unsigned short, true>(reinterpret_cast<const unsigned short*>(p));
  }
}

template <typename T, int N>
__device__ __forceinline__ float RawElem(const RawRow<T, N>& r, int j) {
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(r.w[j]);
  } else {
    return dev::FromBits16<T>((j & 1) ? r.w[j >> 1] >> 16 : r.w[j >> 1] & 0xffffu);
  }
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
// 16-bit inputs: 3 blocks an SM (at most 85 registers), since a thread's loads carry half
// the bytes of fp32's and more of them must be in flight.
template <typename T, int N, bool kStochastic, bool kFast>
__global__ void __launch_bounds__(dev::kClThreadsX* dev::kClThreadsY, sizeof(T) == 2 ? 3 : 2)
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
  uint32_t base[N];
#pragma unroll
  for (int j = 0; j < N; ++j) {
    bits[j] = 0;
    base[j] = 0;
  }
  if (col_ok) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      q[j] = dev::LoadGroupQuantDevice(p, col + j);
      bits[j] = dev::BitsOf(p, col + j);
      base[j] = Codes<kFast>::Base(q[j]);
    }
  }
  const int64_t tiles = (outer + kTileRows - 1) / kTileRows;
  const int64_t seg_codes = outer;

  // Rows tile*64 + 8*ty .. +7 of this thread's columns. The loads of the next tile are
  // issued before the current tile's write phase, so they stay in flight across it.
  RawRow<T, N> v[kRowsPerThread];  // 16-bit values stay packed until quantized
  auto load_tile = [&](int64_t t) {
    const int64_t rb = t * kTileRows + threadIdx.y * kRowsPerThread;
    const T* src = x + rb * groups + col;
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      if (col_ok && rb + i < outer) LoadRawRow<T, N>(src + i * groups, v[i]);
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
            word[j] |= static_cast<uint64_t>(qm::StochasticCode(RawElem<T, N>(v[i], j), q[j], u[i]))
                       << (i * bits[j]);
          }
        }
      }
    } else {
      RunWord run[N];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        if (rbase + i < outer) {
#pragma unroll
          for (int j = 0; j < N; ++j) {
            run[j].Put(i, Codes<kFast>::Nearest(RawElem<T, N>(v[i], j), q[j], base[j]), bits[j]);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < N; ++j) word[j] = run[j].Word(bits[j]);
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

template <typename T, int N, bool kFast>
__global__ void __launch_bounds__(dev::kClThreadsX* dev::kClThreadsY)
    UnpackChannelsLastKernel(const QuantParams p, const int64_t outer, const int64_t groups,
                             const uint8_t* packed, const int64_t* offsets, T* y,
                             const bool chunk_words) {
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
  uint32_t base[N];
  if (col_ok) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      q[j] = dev::LoadGroupQuantDevice<false>(p, col + j);
      base[j] = Codes<kFast>::Base(q[j]);
    }
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
      const int64_t chunk = (row0 >> 3) * k;  // the column's 8k bytes of this tile (see pack)
      const uint8_t* src = packed + seg_offset[cc] + chunk;
      uint64_t word;
      if (chunk_words && (k & (k - 1)) != 0 && chunk + 8 * k <= seg_len &&
          (reinterpret_cast<uintptr_t>(src) & 7) == 0) {
        // Run r from the one or two 8-byte words of the chunk it lies in.
        const uint64_t* cw = reinterpret_cast<const uint64_t*>(src);
        const int bit = 8 * k * r, a = bit >> 6, shift = bit & 63;
        word = cw[a] >> shift;
        if (shift + 8 * k > 64) word |= cw[a + 1] << (64 - shift);
      } else {
        const int64_t pos = chunk + r * k;
        if (pos >= seg_len) continue;
        word = LoadWordBytes(src + r * k, static_cast<int>(Min<int64_t>(k, seg_len - pos)));
      }
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
        for (int j = 0; j < N; ++j) v[j] = Codes<kFast>::Dequant(c[j], q[j], base[j]);
        dev::StoreN<T, N, true>(y + (rbase + i) * groups + col, v);
      }
    }
    __syncthreads();
  }
}

// Codes straight to registers (no shared tile): a thread owns N consecutive columns and R
// consecutive rows (R a multiple of 8). Column c's R codes are R*k/8 contiguous bytes of its
// segment, so the thread loads them with vector loads (a warp touches one 32-byte sector per
// column at R*k/8 >= 32, all of it used), widens them to one byte per code (a switch on k,
// uniform across the warp when the widths are), then writes R rows of N values, each a
// vector store that the warp's 32 lanes make one contiguous run of 32*N values.
template <int K, int R>
__device__ __forceinline__ void WidenCodes(const uint32_t (&w)[R / 4], uint32_t (&c)[R / 4]) {
  constexpr uint32_t kMask = (1u << K) - 1u;
#pragma unroll
  for (int q = 0; q < R / 4; ++q) {  // codes 4q .. 4q+3 -> byte lanes of c[q]
    uint32_t out = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int i = 4 * q + b;
      const int bit = i * K, word = bit >> 5, shift = bit & 31;
      uint32_t code = w[word] >> shift;
      if (shift + K > 32) code |= w[word + 1] << (32 - shift);
      out |= (code & kMask) << (8 * b);
    }
    c[q] = out;
  }
}

template <int R>
__device__ __forceinline__ void LoadColumnCodes(const uint8_t* src, int nbytes,
                                                uint32_t (&w)[R / 4]) {
  // R codes of at most 8 bits: at most R bytes, R/4 words.
#pragma unroll
  for (int i = 0; i < R / 4; ++i) w[i] = 0;
  const uintptr_t a = reinterpret_cast<uintptr_t>(src);
  if ((a & 15) == 0 && (nbytes & 15) == 0) {
#pragma unroll
    for (int v = 0; v < R / 16; ++v) {
      if (16 * v < nbytes) {
        const uint4 q = __ldg(reinterpret_cast<const uint4*>(src) + v);
        w[4 * v] = q.x;
        w[4 * v + 1] = q.y;
        w[4 * v + 2] = q.z;
        w[4 * v + 3] = q.w;
      }
    }
  } else if ((a & 3) == 0 && (nbytes & 3) == 0) {
#pragma unroll
    for (int v = 0; v < R / 4; ++v) {
      if (4 * v < nbytes) w[v] = __ldg(reinterpret_cast<const uint32_t*>(src) + v);
    }
  } else {
    for (int b = 0; b < nbytes; ++b) w[b >> 2] |= static_cast<uint32_t>(src[b]) << (8 * (b & 3));
  }
}

template <typename T, int N, int R, bool kFast>
__global__ void __launch_bounds__(kThreads)
    UnpackChannelsLastDirectKernel(const QuantParams p, const int64_t outer, const int64_t groups,
                                   const uint8_t* packed, const int64_t* offsets, T* y) {
  static_assert(R % 16 == 0 && R <= 64, "R: 16, 32, 48 or 64 rows");
  // A block: 32 lanes x N columns, kThreads / 32 warps on consecutive row chunks.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * 32 + lane) * N;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.y) * (kThreads / 32) + warp) * R;
  if (col >= groups || row0 >= outer) return;
  uint32_t c[N][R / 4];  // byte i % 4 of c[j][i / 4]: code of row row0 + i, column col + j
  qm::GroupQuant q[N];
  uint32_t base[N];
#pragma unroll
  for (int j = 0; j < N; ++j) {
    q[j] = dev::LoadGroupQuantDevice<false>(p, col + j);
    base[j] = Codes<kFast>::Base(q[j]);
    const int k = dev::BitsOf(p, col + j);
    const int64_t seg_len = SegmentBytes(outer, k);
    const int64_t pos = (row0 >> 3) * k;
    const int nbytes =
        static_cast<int>(Min<int64_t>(static_cast<int64_t>(R / 8) * k, seg_len - pos));
    uint32_t w[R / 4];
    LoadColumnCodes<R>(packed + offsets[col + j] + pos, nbytes, w);
    switch (k) {
      case 1:
        WidenCodes<1, R>(w, c[j]);
        break;
      case 2:
        WidenCodes<2, R>(w, c[j]);
        break;
      case 3:
        WidenCodes<3, R>(w, c[j]);
        break;
      case 4:
        WidenCodes<4, R>(w, c[j]);
        break;
      case 5:
        WidenCodes<5, R>(w, c[j]);
        break;
      case 6:
        WidenCodes<6, R>(w, c[j]);
        break;
      case 7:
        WidenCodes<7, R>(w, c[j]);
        break;
      default:
        WidenCodes<8, R>(w, c[j]);
        break;
    }
  }
  T* dst = y + row0 * groups + col;
#pragma unroll
  for (int i = 0; i < R; ++i) {
    if (row0 + i >= outer) break;
    float v[N];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      v[j] = Codes<kFast>::Dequant((c[j][i >> 2] >> (8 * (i & 3))) & 0xffu, q[j], base[j]);
    }
    dev::StoreN<T, N, true>(dst + i * groups, v);
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
template <typename T, bool kContiguous, bool kStochastic, bool kFast>
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
    const uint32_t base = Codes<kFast>::Base(q);
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
        RunWord run;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if (i < n) run.Put(i, Codes<kFast>::Nearest(v[i], q, base), k);
        }
        word = run.Word(k);
      }
      const int64_t pos = (m0 >> 3) * k;
      StoreWordBytes(seg + pos, word, static_cast<int>(Min<int64_t>(k, seg_len - pos)));
    }
  }
}

template <typename T, bool kContiguous, bool kFast>
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
    const uint32_t base = Codes<kFast>::Base(q);
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
        v[i] = Codes<kFast>::Dequant(static_cast<uint32_t>(word >> (i * k)) & mask, q, base);
      }
      StoreRun8<T, kContiguous>(y, m0, n, g, groups, inner, v);
    }
  }
}

// 8 values to 8 consecutive elements at a 16-byte aligned p, with streaming stores (two
// 16-byte stores for fp32, one for 16-bit types).
template <typename T>
__device__ __forceinline__ void StoreVec8(T* p, const float (&v)[8]) {
  if constexpr (sizeof(T) == 4) {
    const float a[4] = {v[0], v[1], v[2], v[3]}, b[4] = {v[4], v[5], v[6], v[7]};
    dev::StoreN<T, 4, true>(p, a);
    dev::StoreN<T, 4, true>(p + 4, b);
  } else {
    dev::StoreN<T, 8, true>(p, v);
  }
}

// The first n (<= 8) of v to y[e0 ..]: one vector store when all 8 go and y is 16-byte
// aligned (e0 is a multiple of 8).
template <typename T, bool kAligned, typename Index>
__device__ __forceinline__ void StoreFlat8(T* y, Index e0, int n, const float (&v)[8]) {
  if (kAligned && n == 8) {
    StoreVec8<T>(y + e0, v);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (i < n) y[e0 + i] = dev::Elem<T>::Store(v[i]);
    }
  }
}

// Unpack for layouts whose runs of 8 codes are not contiguous in y (inner % 8 != 0): a thread
// writes 8 consecutive elements of y (vector stores when y is 16-byte aligned), gathering each
// code's bits (at most 2 bytes) from its group's segment. It finds the first element's row
// (o, g) with one division and steps to the next group where a row of `inner` ends.
template <typename T, typename Index, bool kAligned, bool kFast>
__global__ void __launch_bounds__(kThreads)
    UnpackFlatKernel(const QuantParams p, const Index numel, const Index groups, const Index inner,
                     const uint8_t* packed, const int64_t* offsets, T* y) {
  const Index runs = (numel + 7) / 8;
  const Index stride = static_cast<Index>(gridDim.x) * kThreads;
  for (Index r = static_cast<Index>(blockIdx.x) * kThreads + threadIdx.x; r < runs; r += stride) {
    const Index e0 = r * 8;
    const int n = numel - e0 < 8 ? static_cast<int>(numel - e0) : 8;
    const Index row = e0 / inner;
    Index j = e0 - row * inner;
    Index o = row / groups;
    Index g = row - o * groups;
    qm::GroupQuant q = dev::LoadGroupQuantDevice<false>(p, static_cast<int64_t>(g));
    uint32_t base = Codes<kFast>::Base(q);
    int k = dev::BitsOf(p, static_cast<int64_t>(g));
    const uint8_t* seg = packed + offsets[g];
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (j == inner) {  // the next row: the next group (and the next o after the last)
        j = 0;
        if (++g == groups) {
          g = 0;
          ++o;
        }
        q = dev::LoadGroupQuantDevice<false>(p, static_cast<int64_t>(g));
        base = Codes<kFast>::Base(q);
        k = dev::BitsOf(p, static_cast<int64_t>(g));
        seg = packed + offsets[g];
      }
      v[i] = 0.0f;
      if (i < n) {
        const int64_t bit = (static_cast<int64_t>(o) * inner + j) * k;
        const int shift = static_cast<int>(bit & 7);
        const uint8_t* src = seg + (bit >> 3);
        // A code's bits lie inside its segment, so the second byte exists when needed.
        uint32_t word = src[0];
        if (shift + k > 8) word |= static_cast<uint32_t>(src[1]) << 8;
        v[i] = Codes<kFast>::Dequant((word >> shift) & ((1u << k) - 1u), q, base);
      }
      ++j;
    }
    StoreFlat8<T, kAligned>(y, e0, n, v);
  }
}

template <typename T, typename Index, bool kFast>
void LaunchUnpackFlat(cudaStream_t stream, const GroupLayout& l, const QuantParams& p,
                      const uint8_t* packed, const int64_t* offsets, T* y) {
  const auto blocks = static_cast<unsigned>(
      std::min<int64_t>(dev::CeilDiv(dev::CeilDiv(l.numel(), 8), kThreads), 1 << 16));
  const auto numel = static_cast<Index>(l.numel());
  const auto groups = static_cast<Index>(l.groups);
  const auto inner = static_cast<Index>(l.inner);
  if (dev::Aligned16(y)) {
    UnpackFlatKernel<T, Index, true, kFast>
        <<<blocks, kThreads, 0, stream>>>(p, numel, groups, inner, packed, offsets, y);
  } else {
    UnpackFlatKernel<T, Index, false, kFast>
        <<<blocks, kThreads, 0, stream>>>(p, numel, groups, inner, packed, offsets, y);
  }
}

// ---- unpack of rows of 8 or more elements, not a multiple of 8 ----------------------------
// 8 consecutive elements of y lie in at most two rows of `inner` >= 8 elements, so their
// codes are at most two runs of consecutive codes (of one group each), and a run of at most
// 8 codes (64 bits) lies in at most two aligned 8-byte words of packed. A thread loads those
// words, spreads the codes to registers and writes its 8 elements with vector stores: no
// shared memory, no byte loads. Opt-in and not yet run on a GPU (UseRuns).

// Bits [bit, bit + nbits) of packed (nbits <= 64) at the low end of the result (the bits above
// are whatever follows). Aligned 8-byte loads inside the buffer; byte loads at its ends.
__device__ __forceinline__ uint64_t LoadBits(const uint8_t* packed, int64_t packed_bytes,
                                             int64_t bit, int nbits) {
  const uint8_t* src = packed + (bit >> 3);
  const int shift = static_cast<int>(bit & 7);
  const uintptr_t a = reinterpret_cast<uintptr_t>(src);
  const uint8_t* w = reinterpret_cast<const uint8_t*>(a & ~uintptr_t{7});
  const int sh = static_cast<int>(a & 7) * 8 + shift;  // 0 .. 63
  const bool two = sh + nbits > 64;                    // implies sh > 0
  if (w >= packed && w + (two ? 16 : 8) <= packed + packed_bytes) {
    const auto* words = reinterpret_cast<const unsigned long long*>(w);
    const uint64_t lo = __ldg(words);
    if (!two) return lo >> sh;
    return (lo >> sh) | (static_cast<uint64_t>(__ldg(words + 1)) << (64 - sh));
  }
  const int nb = (shift + nbits + 7) >> 3;  // <= 9; 9 only when shift > 0
  uint64_t word = src[0] >> shift;
  for (int b = 1; b < nb; ++b) word |= static_cast<uint64_t>(src[b]) << (8 * b - shift);
  return word;
}

template <typename T, bool kAligned, bool kFast>
__global__ void __launch_bounds__(kThreads)
    UnpackRunsKernel(const QuantParams p, const uint32_t numel, const uint32_t groups,
                     const uint32_t inner, const uint8_t* packed, const int64_t packed_bytes,
                     const int64_t* offsets, T* y) {
  const uint32_t runs = (numel + 7) / 8;
  const uint32_t stride = gridDim.x * kThreads;
  for (uint32_t r = blockIdx.x * kThreads + threadIdx.x; r < runs; r += stride) {
    const uint32_t e0 = r * 8;
    const int n = static_cast<int>(Min<uint32_t>(8, numel - e0));
    const uint32_t row = e0 / inner;
    const uint32_t j = e0 - row * inner;
    const uint32_t o = row / groups;
    const uint32_t g = row - o * groups;
    const int n1 = static_cast<int>(Min<uint32_t>(n, inner - j));  // >= 1
    // Run 1: codes o * inner + j .. of group g.
    const int k1 = dev::BitsOf(p, g);
    const qm::GroupQuant q1 = dev::LoadGroupQuantDevice<false>(p, g);
    const uint32_t base1 = Codes<kFast>::Base(q1);
    const uint64_t w1 = LoadBits(
        packed, packed_bytes, offsets[g] * 8 + static_cast<int64_t>(o * inner + j) * k1, n1 * k1);
    // Run 2: the next row's first codes (group g + 1 of row o, or group 0 of row o + 1),
    // shifted up so that code i of the 8 sits at bit i * k2.
    int k2 = k1;
    qm::GroupQuant q2 = q1;
    uint32_t base2 = base1;
    uint64_t w2 = 0;
    if (n > n1) {
      const bool wrap = g + 1 == groups;
      const uint32_t g2 = wrap ? 0 : g + 1;
      const uint32_t o2 = wrap ? o + 1 : o;
      k2 = dev::BitsOf(p, g2);
      q2 = dev::LoadGroupQuantDevice<false>(p, g2);
      base2 = Codes<kFast>::Base(q2);
      w2 = LoadBits(packed, packed_bytes, offsets[g2] * 8 + static_cast<int64_t>(o2) * inner * k2,
                    (n - n1) * k2)
           << (n1 * k2);
    }
    const uint32_t lo1 = static_cast<uint32_t>(w1), hi1 = static_cast<uint32_t>(w1 >> (4 * k1));
    const uint32_t lo2 = static_cast<uint32_t>(w2), hi2 = static_cast<uint32_t>(w2 >> (4 * k2));
    const uint32_t m1 = (1u << k1) - 1u, m2 = (1u << k2) - 1u;
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const bool first = i < n1;
      const uint32_t half = first ? (i < 4 ? lo1 : hi1) : (i < 4 ? lo2 : hi2);
      const int k = first ? k1 : k2;
      const uint32_t code = (half >> ((i & 3) * k)) & (first ? m1 : m2);
      v[i] = Codes<kFast>::Dequant(code, first ? q1 : q2, first ? base1 : base2);
    }
    StoreFlat8<T, kAligned>(y, e0, n, v);
  }
}

// Rows of 8 <= inner elements (inner % 8 != 0) with 32-bit element indices, only with
// SPLITQ_KERNELS_RUNS=1 for now: the kernel was written and compiled in a session that had no
// GPU, so it is neither checked against the CPU path on a device nor timed against
// UnpackStagedKernel (which these layouts take otherwise). To do both on a GPU host:
//   SPLITQ_KERNELS_RUNS=1 cuda_vs_cpu_test --gtest_filter='*Unpack*'
//   SPLITQ_KERNELS_RUNS=0|1 splitq bench kernels --device cuda --iters 50 --filter 7x7
bool UseRuns(const GroupLayout& l) {
  static const bool on = [] {
    const char* e = std::getenv("SPLITQ_KERNELS_RUNS");
    return e != nullptr && e[0] == '1';
  }();
  return on && l.inner >= 8 && l.inner % 8 != 0 && l.numel() < (int64_t{1} << 31);
}

template <typename T, bool kFast>
absl::Status LaunchUnpackRuns(cudaStream_t stream, const GroupLayout& l, const QuantParams& p,
                              const uint8_t* packed, int64_t packed_bytes, const int64_t* offsets,
                              T* y) {
  const auto blocks = static_cast<unsigned>(
      std::min<int64_t>(dev::CeilDiv(dev::CeilDiv(l.numel(), 8), kThreads), 1 << 16));
  const auto numel = static_cast<uint32_t>(l.numel());
  const auto groups = static_cast<uint32_t>(l.groups);
  const auto inner = static_cast<uint32_t>(l.inner);
  if (dev::Aligned16(y)) {
    UnpackRunsKernel<T, true, kFast><<<blocks, kThreads, 0, stream>>>(
        p, numel, groups, inner, packed, packed_bytes, offsets, y);
  } else {
    UnpackRunsKernel<T, false, kFast><<<blocks, kThreads, 0, stream>>>(
        p, numel, groups, inner, packed, packed_bytes, offsets, y);
  }
  SPLITQ_CUDA_CHECK_LAUNCH("UnpackRunsKernel");
  return absl::OkStatus();
}

// ---- unpack of short rows, staged in shared memory ---------------------------------------
// Layouts whose rows are not a multiple of 8 elements (inner % 8 != 0, inner <= 2048: NCHW
// 7x7 has inner = 49; [N, C] with fewer than 32 channels has inner = 1) take tiles of R
// outer rows (R a multiple of 8) x G groups. Group g's codes of the tile's rows are one
// byte-aligned run of R * inner * k bits of its segment (R * inner * k is a multiple of 8),
// and the tile's elements of y are R runs of G * inner consecutive elements (one run when G
// is every group). A block reads the codes with k-byte loads on consecutive runs of a
// segment into a shared tile of byte codes laid out in y's order (position
// q = r * G * inner + (g - g0) * inner + j), then writes y with vector stores on consecutive
// positions. UnpackFlatKernel (above) gathers each code's bits from global memory instead:
// on the H100, NCHW 7x7 at 4 bits, fp32 54% -> 71% of copy, bf16 32% -> 42%.
// The same staging for pack was slower than PackGenericKernel there (fp32 80% -> 45-63%)
// and is not used.
constexpr int kStageCodes = 16384;  // byte codes of a full tile (shared memory)

struct StageQuant {
  qm::GroupQuant q;
  uint32_t base;
  int bits;
};

// The tile's shape: rows x groups (both counts of a full tile).
struct StageGrid {
  int rows = 0, groups = 0;
  int64_t row_tiles = 0, col_tiles = 0;
  size_t smem = 0;  // dynamic shared memory: the codes, then one StageQuant per group
};

bool UseStaged(const GroupLayout& l) {
  static const bool off = [] {
    const char* e = std::getenv("SPLITQ_KERNELS_STAGED");
    return e != nullptr && e[0] == '0';
  }();
  // The kernel indexes groups with int (a tile's groups and positions are small).
  return !off && l.inner % 8 != 0 && l.inner <= kStageCodes / 8 && l.outer > 0 && l.groups > 0 &&
         l.groups <= std::numeric_limits<int32_t>::max();
}

StageGrid MakeStageGrid(const GroupLayout& l) {
  StageGrid s;
  const int64_t row_codes = l.groups * l.inner;
  if (8 * row_codes <= kStageCodes) {
    s.groups = static_cast<int>(l.groups);
    const int64_t rows = 8 * std::max<int64_t>(1, kStageCodes / (8 * row_codes));
    s.rows = static_cast<int>(std::min(rows, dev::CeilDiv(l.outer, 8) * 8));
  } else {
    // Groups a tile: a multiple of `align` when it fits, so that every run of G * inner
    // elements starts 8-aligned in y when the row does; spread evenly over the column tiles.
    const int64_t align = 8 / std::gcd<int64_t>(l.inner, 8);
    int64_t g = kStageCodes / (8 * l.inner);  // >= 1: inner <= kStageCodes / 8
    if (g >= align) g = g / align * align;
    const int64_t tiles = dev::CeilDiv(l.groups, g);
    int64_t even = dev::CeilDiv(l.groups, tiles);
    if (g >= align) even = dev::CeilDiv(even, align) * align;
    s.groups = static_cast<int>(std::min(even, g));
    s.rows = 8;
  }
  s.row_tiles = dev::CeilDiv(l.outer, s.rows);
  s.col_tiles = dev::CeilDiv(l.groups, s.groups);
  const size_t codes = static_cast<size_t>(s.rows) * s.groups * l.inner;
  s.smem = (codes + 15) / 16 * 16 + static_cast<size_t>(s.groups) * sizeof(StageQuant);
  return s;
}

// One tile's place: rows o0 .. o0+rows-1, groups g0 .. g0+gn-1.
struct StageTile {
  int64_t o0;
  int g0, rows, gn, span, n;  // span = gn * inner elements a row; n = rows * span
  __device__ __forceinline__ StageTile(int64_t t, const StageGrid& s, int64_t outer, int groups,
                                       int inner) {
    const int64_t rt = t / s.col_tiles;
    g0 = static_cast<int>(t - rt * s.col_tiles) * s.groups;
    o0 = rt * s.rows;
    rows = static_cast<int>(Min<int64_t>(s.rows, outer - o0));
    gn = Min(s.groups, groups - g0);
    span = gn * inner;
    n = rows * span;
  }
  // Index in y of tile position q (q < n), given q's row r and column c = q - r * span.
  __device__ __forceinline__ int64_t Elem(int r, int c, int groups, int inner) const {
    return ((o0 + r) * groups + g0) * inner + c;
  }
};

template <bool kFast>
__device__ __forceinline__ void LoadStageQuant(const QuantParams& p, const StageTile& t,
                                               StageQuant* sq) {
  for (int i = threadIdx.x; i < t.gn; i += blockDim.x) {
    StageQuant s;
    s.q = dev::LoadGroupQuantDevice(p, t.g0 + i);
    s.base = Codes<kFast>::Base(s.q);
    s.bits = dev::BitsOf(p, t.g0 + i);
    sq[i] = s;
  }
}

// Walks positions of a tile in steps of one element: (group of the tile, j in its row).
struct StageWalker {
  int gl, j;
  __device__ __forceinline__ StageWalker(int c, int inner) {
    gl = c / inner;
    j = c - gl * inner;
  }
  // True where the step crossed into the next group.
  __device__ __forceinline__ bool Next(int inner, int gn) {
    if (++j < inner) return false;
    j = 0;
    if (++gl == gn) gl = 0;
    return true;
  }
};

// Writes elements q0 .. q0+cnt-1 of the tile (row r, column c of q0) to y: one vector
// store when the 8 are contiguous and 16-byte aligned in y.
template <typename T, bool kAligned>
__device__ __forceinline__ void StoreStaged(T* y, const StageTile& t, int r, int c, int cnt,
                                            int groups, int inner, const float (&v)[8]) {
  const int64_t e = t.Elem(r, c, groups, inner);
  const bool contiguous = t.gn == groups || c + 8 <= t.span;  // every group: rows abut
  if (kAligned && cnt == 8 && contiguous && (e & 7) == 0) {
    StoreVec8<T>(y + e, v);
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (i < cnt) {
      int rr = r, cc = c + i;
      while (cc >= t.span) {
        cc -= t.span;
        ++rr;
      }
      y[t.Elem(rr, cc, groups, inner)] = dev::Elem<T>::Store(v[i]);
    }
  }
}

// Position in the tile of code m of group gl's run of the tile's rows.
__device__ __forceinline__ int StagePos(const StageTile& t, int gl, int m, int inner, int& j) {
  const int r = m / inner;
  j = m - r * inner;
  return r * t.span + gl * inner + j;
}

template <typename T, bool kAligned, bool kFast>
__global__ void __launch_bounds__(kThreads)
    UnpackStagedKernel(const QuantParams p, const StageGrid s, const int64_t outer,
                       const int groups, const int inner, const uint8_t* packed,
                       const int64_t* offsets, T* y) {
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* codes = smem;
  StageQuant* sq = reinterpret_cast<StageQuant*>(
      smem + (static_cast<size_t>(s.rows) * s.groups * inner + 15) / 16 * 16);
  const int64_t seg_codes = outer * inner;
  const int64_t tiles = s.row_tiles * s.col_tiles;
  for (int64_t ti = blockIdx.x; ti < tiles; ti += gridDim.x) {
    const StageTile t(ti, s, outer, groups, inner);
    __syncthreads();  // the previous tile's readers are done with codes and sq
    LoadStageQuant<kFast>(p, t, sq);
    // 1. Codes to the shared tile: unit u of group gl is codes 8u .. 8u+7 of the group's run
    //    (k bytes); consecutive threads take consecutive units of a segment.
    const int chunk = t.rows * inner;
    const int units = (chunk + 7) / 8;
    for (int i = threadIdx.x; i < t.gn * units; i += blockDim.x) {
      const int gl = i / units, u = i - gl * units;
      const int64_t g = t.g0 + gl;
      const int k = dev::BitsOf(p, g);
      const int64_t pos = t.o0 * inner / 8 * k + static_cast<int64_t>(u) * k;
      const int64_t seg_len = SegmentBytes(seg_codes, k);
      const uint64_t word = LoadWordBytes(packed + offsets[g] + pos,
                                          static_cast<int>(Min<int64_t>(k, seg_len - pos)));
      const int cnt = Min(8, chunk - 8 * u);
      int j;
      int q = StagePos(t, gl, 8 * u, inner, j);
      const uint32_t mask = (1u << k) - 1u;
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        if (b < cnt) {
          codes[q] = static_cast<uint8_t>((word >> (b * k)) & mask);
          if (++j == inner) {
            j = 0;
            q += t.span - inner + 1;
          } else {
            ++q;
          }
        }
      }
    }
    __syncthreads();
    // 2. Values: a thread takes 8 consecutive positions (one 8-byte shared load).
    for (int q0 = threadIdx.x * 8; q0 < t.n; q0 += blockDim.x * 8) {
      const int cnt = Min(8, t.n - q0);
      const int r = q0 / t.span, c = q0 - r * t.span;
      const uint2 cw = *reinterpret_cast<const uint2*>(codes + q0);
      StageWalker w(c, inner);
      StageQuant sg = sq[w.gl];  // reloaded only where the walk enters the next group
      float v[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const uint32_t code = ((i < 4 ? cw.x : cw.y) >> (8 * (i & 3))) & 0xffu;
        v[i] = Codes<kFast>::Dequant(code, sg.q, sg.base);
        if (w.Next(inner, t.gn) && i < 7) sg = sq[w.gl];
      }
      StoreStaged<T, kAligned>(y, t, r, c, cnt, groups, inner, v);
    }
  }
}

// One wave of blocks at most (each walks tiles with a stride).
template <typename Kernel>
absl::StatusOr<unsigned> StagedBlocks(Kernel kernel, const StageGrid& s) {
  int device = 0, sms = 0, per_sm = 0;
  SPLITQ_CUDA_CHECK(cudaGetDevice(&device));
  SPLITQ_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  SPLITQ_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, s.smem));
  const int64_t slots = std::max<int64_t>(1, static_cast<int64_t>(sms) * std::max(per_sm, 1));
  return static_cast<unsigned>(std::min(s.row_tiles * s.col_tiles, slots));
}

template <typename T, bool kFast>
absl::Status LaunchUnpackStaged(cudaStream_t stream, const GroupLayout& l, const QuantParams& p,
                                const uint8_t* packed, const int64_t* offsets, T* y) {
  const StageGrid s = MakeStageGrid(l);
  const auto run = [&](auto kernel) -> absl::Status {
    absl::StatusOr<unsigned> blocks = StagedBlocks(kernel, s);
    if (!blocks.ok()) return blocks.status();
    kernel<<<*blocks, kThreads, s.smem, stream>>>(p, s, l.outer, static_cast<int>(l.groups),
                                                  static_cast<int>(l.inner), packed, offsets, y);
    SPLITQ_CUDA_CHECK_LAUNCH("UnpackStagedKernel");
    return absl::OkStatus();
  };
  return dev::Aligned16(y) ? run(UnpackStagedKernel<T, true, kFast>)
                           : run(UnpackStagedKernel<T, false, kFast>);
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

// SPLITQ_KERNELS_CHUNKWORDS=0 makes the channels-last unpack read every run's k bytes
// alone, as before (odd widths: byte loads), to time the two side by side in one build.
bool ChunkWords() {
  static const bool off = [] {
    const char* e = std::getenv("SPLITQ_KERNELS_CHUNKWORDS");
    return e != nullptr && e[0] == '0';
  }();
  return !off;
}

bool UseChannelsLast(const GroupLayout& l) { return l.inner == 1 && l.groups >= dev::kClThreadsX; }

// Persistent grid: one wave of blocks (as many as fit on the device at once), each
// walking row tiles with a stride, so that its prologue is paid once and its loads overlap
// its pack phases.
template <typename T, int N, bool kStochastic, bool kFast>
absl::Status LaunchPackCl(cudaStream_t stream, const GroupLayout& l, const QuantParams& p,
                          const RoundingSpec& r, const T* x, const int64_t* offsets,
                          uint8_t* packed) {
  const auto kernel = PackChannelsLastKernel<T, N, kStochastic, kFast>;
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

template <typename T, bool kContiguous, bool kStochastic, bool kFast>
void LaunchPackGeneric(cudaStream_t stream, const GroupLayout& l, const QuantParams& p,
                       const RoundingSpec& r, const T* x, const int64_t* offsets, uint8_t* packed) {
  const GenericGrid g = MakeGenericGrid(l);
  PackGenericKernel<T, kContiguous, kStochastic, kFast>
      <<<g.blocks, g.threads, 0, stream>>>(p, l.outer, l.groups, l.inner, g.codes_per_unit,
                                           g.units_per_group, r.seed, r.step, x, offsets, packed);
}

template <typename T, bool kStochastic, bool kFast>
absl::Status LaunchPack(cudaStream_t stream, const GroupLayout& l, const QuantParams& p,
                        const RoundingSpec& r, const T* x, const int64_t* offsets,
                        uint8_t* packed) {
  // 4 columns per thread (16-byte loads for fp32, 8-byte for 16-bit types): 8 rows x 8
  // columns of a 16-bit type would cost too many registers.
  constexpr int V = 4;
  if (UseChannelsLast(l)) {
    if (dev::AlignedTo(x, V * sizeof(T)) && l.groups % V == 0) {
      return LaunchPackCl<T, V, kStochastic, kFast>(stream, l, p, r, x, offsets, packed);
    }
    return LaunchPackCl<T, 1, kStochastic, kFast>(stream, l, p, r, x, offsets, packed);
  }
  if (dev::Aligned16(x) && l.inner % 8 == 0) {
    LaunchPackGeneric<T, true, kStochastic, kFast>(stream, l, p, r, x, offsets, packed);
  } else {
    LaunchPackGeneric<T, false, kStochastic, kFast>(stream, l, p, r, x, offsets, packed);
  }
  SPLITQ_CUDA_CHECK_LAUNCH("PackGenericKernel");
  return absl::OkStatus();
}

template <typename T, bool kFast>
absl::Status LaunchUnpack(cudaStream_t stream, const GroupLayout& l, const QuantParams& p,
                          const uint8_t* packed, int64_t packed_bytes, const int64_t* offsets,
                          T* y) {
  constexpr int V = dev::Elem<T>::kVec;
  if constexpr (sizeof(T) == 2) {
    // 16-bit outputs: codes straight to registers, 4 columns (8-byte stores) x 32 rows a
    // thread (on the H100 at 4 bits: 75% of copy, against 61% for the shared tile). The grid
    // covers kClMaxGridY * 256 rows; taller tensors take the shared tile below.
    constexpr int kN = 4, kR = 32;
    const int64_t chunks = dev::CeilDiv(l.outer, kR * (kThreads / 32));
    if (UseChannelsLast(l) && dev::AlignedTo(y, kN * sizeof(T)) && l.groups % kN == 0 &&
        chunks <= dev::kClMaxGridY) {
      const dim3 grid(static_cast<unsigned>(dev::CeilDiv(l.groups, 32 * kN)),
                      static_cast<unsigned>(chunks));
      UnpackChannelsLastDirectKernel<T, kN, kR, kFast>
          <<<grid, kThreads, 0, stream>>>(p, l.outer, l.groups, packed, offsets, y);
      SPLITQ_CUDA_CHECK_LAUNCH("UnpackChannelsLastDirectKernel");
      return absl::OkStatus();
    }
  }
  if (UseChannelsLast(l)) {
    const int64_t tiles = dev::CeilDiv(l.outer, kTileRows);
    const dim3 block(dev::kClThreadsX, dev::kClThreadsY);
    const auto grid_y = static_cast<unsigned>(std::min<int64_t>(tiles, dev::kClMaxGridY));
    if (dev::Aligned16(y) && l.groups % V == 0) {
      const dim3 grid(static_cast<unsigned>(dev::CeilDiv(l.groups, ClTile<V>::kCols)), grid_y);
      UnpackChannelsLastKernel<T, V, kFast>
          <<<grid, block, 0, stream>>>(p, l.outer, l.groups, packed, offsets, y, ChunkWords());
    } else {
      const dim3 grid(static_cast<unsigned>(dev::CeilDiv(l.groups, ClTile<1>::kCols)), grid_y);
      UnpackChannelsLastKernel<T, 1, kFast>
          <<<grid, block, 0, stream>>>(p, l.outer, l.groups, packed, offsets, y, ChunkWords());
    }
    SPLITQ_CUDA_CHECK_LAUNCH("UnpackChannelsLastKernel");
    return absl::OkStatus();
  }
  if (l.inner % 8 == 0) {
    const GenericGrid g = MakeGenericGrid(l);
    if (dev::Aligned16(y)) {
      UnpackGenericKernel<T, true, kFast><<<g.blocks, g.threads, 0, stream>>>(
          p, l.outer, l.groups, l.inner, g.codes_per_unit, g.units_per_group, packed, offsets, y);
    } else {
      UnpackGenericKernel<T, false, kFast><<<g.blocks, g.threads, 0, stream>>>(
          p, l.outer, l.groups, l.inner, g.codes_per_unit, g.units_per_group, packed, offsets, y);
    }
    SPLITQ_CUDA_CHECK_LAUNCH("UnpackGenericKernel");
    return absl::OkStatus();
  }
  if (UseRuns(l)) return LaunchUnpackRuns<T, kFast>(stream, l, p, packed, packed_bytes, offsets, y);
  if (UseStaged(l)) return LaunchUnpackStaged<T, kFast>(stream, l, p, packed, offsets, y);
  if (l.numel() < (int64_t{1} << 31)) {
    LaunchUnpackFlat<T, uint32_t, kFast>(stream, l, p, packed, offsets, y);
  } else {
    LaunchUnpackFlat<T, uint64_t, kFast>(stream, l, p, packed, offsets, y);
  }
  SPLITQ_CUDA_CHECK_LAUNCH("UnpackFlatKernel");
  return absl::OkStatus();
}

// Codes<true> applies: no zero point, so lo and hi are the small integers qmin and qmax.
// SPLITQ_KERNELS_CONVERT=1 forces quant_math.h's conversions instead, to measure the two
// side by side in one build (`splitq bench kernels`); the codes and values are the same.
bool IntegerCodes(const QuantParams& p) {
  static const bool convert = [] {
    const char* e = std::getenv("SPLITQ_KERNELS_CONVERT");
    return e != nullptr && e[0] == '1';
  }();
  return p.zero_point == nullptr && !convert;
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
    if (rounding.mode == Rounding::kStochastic) {
      return LaunchPack<T, true, false>(s, layout, params, rounding, xt, group_offsets, packed);
    }
    return IntegerCodes(params)
               ? LaunchPack<T, false, true>(s, layout, params, rounding, xt, group_offsets, packed)
               : LaunchPack<T, false, false>(s, layout, params, rounding, xt, group_offsets,
                                             packed);
  });
}

absl::Status UnpackDequantize(void* stream, DType dtype, const GroupLayout& layout,
                              const QuantParams& params, const uint8_t* packed,
                              int64_t packed_bytes, const int64_t* group_offsets, void* y) {
  if (layout.numel() == 0) return absl::OkStatus();
  const auto s = static_cast<cudaStream_t>(stream);
  return dev::DispatchDeviceDType(dtype, [&](auto tag) -> absl::Status {
    using T = decltype(tag);
    T* yt = static_cast<T*>(y);
    return IntegerCodes(params)
               ? LaunchUnpack<T, true>(s, layout, params, packed, packed_bytes, group_offsets, yt)
               : LaunchUnpack<T, false>(s, layout, params, packed, packed_bytes, group_offsets, yt);
  });
}

}  // namespace splitq::kernels::cuda
