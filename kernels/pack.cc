// CPU path of pack.h, and the device dispatch.
//
// Channels last (inner == 1, e.g. [N, C] on axis 1): tiles of 8 rows. Codes of a tile are
// computed row by row (vectorised across channels) into a small per-thread table, then
// each channel's 8 codes become exactly k_c bytes of its segment. Otherwise a group's codes
// are taken in chunks of 1024: their codes come from the chunk's contiguous runs of x (up to
// `inner` elements each) into a byte per code, in loops the compiler vectorises, and are
// then packed (4 and 8 bits without the general shift loop). Unpacking mirrors it.
#include "kernels/pack.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/detail/code_bytes.h"
#include "kernels/detail/cpu_dispatch.h"
#include "kernels/detail/cuda_launchers.h"
#include "kernels/detail/philox_batch.h"

namespace splitq::kernels {
namespace {

using detail::GroupTable;

// Runs of codes handed to one OpenMP iteration in the general path (a multiple of 8).
constexpr int64_t kCodesPerUnit = 8 * 1024;

// Uniform draws for consecutive element indices, one Philox block (4 elements) at a time: for
// short runs (8 rows of a channel in the channels-last path), where a batch of 8 blocks would
// compute more than it uses.
class BlockUniforms {
 public:
  BlockUniforms(uint64_t seed, uint64_t step) : seed_(seed), step_(step) {}
  float At(uint64_t element) {
    const uint64_t block = element >> 2;
    if (block != block_) {
      block_ = block;
      draws_ = PhiloxBlock(seed_, step_, block);
    }
    return PhiloxUniform(draws_.v[element & 3]);
  }

 private:
  uint64_t seed_, step_;
  uint64_t block_ = std::numeric_limits<uint64_t>::max();
  Philox4 draws_{};
};

// Uniform draws for long runs of consecutive element indices: the Philox draws of 32 elements
// (8 blocks) at a time, computed together (detail/philox_batch.h: eight lanes wide with AVX2).
class UniformStream {
 public:
  UniformStream(uint64_t seed, uint64_t step) : seed_(seed), step_(step) {}
  float At(uint64_t element) {
    const uint64_t block = element >> 2;
    if (block - first_ >= 8) {  // (first_ starts above every block: the first call fills)
      first_ = block;
      detail::PhiloxUniforms32(seed_, step_, block, draws_);
    }
    return draws_[element - 4 * first_];
  }

 private:
  uint64_t seed_, step_;
  uint64_t first_ = std::numeric_limits<uint64_t>::max() - 8;
  float draws_[32];
};

inline void StoreBytes(uint64_t word, uint8_t* dst, int64_t nbytes) {
  for (int64_t b = 0; b < nbytes; ++b) dst[b] = static_cast<uint8_t>(word >> (8 * b));
}
inline uint64_t LoadBytes(const uint8_t* src, int64_t nbytes) {
  uint64_t word = 0;
  for (int64_t b = 0; b < nbytes; ++b) word |= static_cast<uint64_t>(src[b]) << (8 * b);
  return word;
}

int BitsOf(const QuantParams& p, int64_t g) {
  return p.bits != nullptr ? p.bits[g] : p.uniform_bits;
}

// The general path works on chunks of a group's codes: first the codes of the chunk, one
// contiguous run of x (at most `inner` elements) at a time, in loops the compiler
// vectorises; then the chunk's codes become its bytes of the segment.
constexpr int64_t kChunkCodes = 1024;  // a multiple of 8
static_assert(kCodesPerUnit % kChunkCodes == 0);

// detail::StochasticCode and detail::DequantCode with int32 conversions, which SSE2
// vectorises (their uint32 ones it does not); the same values for codes below 2^31.
inline uint8_t StochasticByte(float x, const detail::GroupQuant& q, float u) {
  float v = detail::ScaledValue(x, q);
  v = v > q.lo ? v : q.lo;  // NaN -> lo
  v = v < q.hi ? v : q.hi;
  const int32_t code = static_cast<int32_t>(detail::Add(detail::Sub(v, q.lo), u));  // >= 0
  const auto max_code = static_cast<int32_t>(q.hi - q.lo);
  return static_cast<uint8_t>(code < max_code ? code : max_code);
}
inline float DequantByte(uint8_t code, const detail::GroupQuant& q) {
  return detail::Add(
      detail::Mul(detail::Add(static_cast<float>(static_cast<int32_t>(code)), q.lo), q.scale),
      q.offset);
}

// Codes m0 .. m0 + n - 1 of group g of an [outer, groups, inner] layout, as runs of x:
// fn(offset into x, first code's index - m0, run length).
template <typename Fn>
inline void ForEachRun(int64_t m0, int64_t n, int64_t g, int64_t groups, int64_t inner, Fn&& fn) {
  int64_t o = m0 / inner, i = m0 - o * inner;
  for (int64_t done = 0; done < n;) {
    const int64_t len = std::min(inner - i, n - done);
    fn((o * groups + g) * inner + i, done, len);
    done += len;
    i = 0;
    ++o;
  }
}

template <DType D>
void PackCpu(const ExecContext& ctx, const GroupLayout& layout, const QuantParams& p,
             const GroupTable& t, const RoundingSpec& rounding, const void* x_raw,
             const int64_t* offsets, uint8_t* packed) {
  using E = detail::HostElement<D>;
  using T = typename E::Storage;
  const T* x = static_cast<const T*>(x_raw);
  const int64_t groups = layout.groups, inner = layout.inner;
  const int64_t codes_per_group = layout.per_group();
  const bool stochastic = rounding.mode == Rounding::kStochastic;
  const int threads = detail::CpuThreads(ctx);
  const bool parallel = layout.numel() >= (1 << 15);

  if (inner == 1) {
    const int64_t tiles = (layout.outer + 7) / 8;
    const float *inv = t.inv_scale.data(), *off = t.offset.data(), *lo = t.lo.data(),
                *hi = t.hi.data();
#pragma omp parallel num_threads(threads) if (parallel)
    {
      std::vector<uint8_t> codes(8 * groups);
#pragma omp for schedule(static)
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t row0 = tile * 8;
        const int64_t rows = std::min<int64_t>(8, layout.outer - row0);
        std::fill(codes.begin(), codes.end(), 0);
        if (!stochastic) {
          for (int64_t r = 0; r < rows; ++r) {
            const T* xr = x + (row0 + r) * groups;
            uint8_t* cr = codes.data() + r * groups;
            for (int64_t g = 0; g < groups; ++g) {
              float v = (E::Load(xr[g]) - off[g]) * inv[g];
              v = v > lo[g] ? v : lo[g];
              v = v < hi[g] ? v : hi[g];
              cr[g] = static_cast<uint8_t>(static_cast<int32_t>(detail::RoundEven(v) - lo[g]));
            }
          }
        } else {
          for (int64_t g = 0; g < groups; ++g) {
            BlockUniforms uniform(rounding.seed, rounding.step);
            const detail::GroupQuant q = t.at(g);
            for (int64_t r = 0; r < rows; ++r) {
              const uint64_t element = static_cast<uint64_t>(g * codes_per_group + row0 + r);
              codes[r * groups + g] = static_cast<uint8_t>(detail::StochasticCode(
                  E::Load(x[(row0 + r) * groups + g]), q, uniform.At(element)));
            }
          }
        }
        for (int64_t g = 0; g < groups; ++g) {
          const int k = BitsOf(p, g);
          uint64_t word = 0;
          for (int r = 0; r < 8; ++r)
            word |= static_cast<uint64_t>(codes[r * groups + g]) << (r * k);
          StoreBytes(word, packed + offsets[g] + tile * k, (rows * k + 7) / 8);
        }
      }
    }
    return;
  }

  const int64_t units_per_group = (codes_per_group + kCodesPerUnit - 1) / kCodesPerUnit;
  const int64_t units = groups * units_per_group;
#pragma omp parallel for num_threads(threads) schedule(static) if (parallel)
  for (int64_t unit = 0; unit < units; ++unit) {
    const int64_t g = unit / units_per_group;
    const int64_t m_begin = (unit % units_per_group) * kCodesPerUnit;
    const int64_t m_end = std::min(codes_per_group, m_begin + kCodesPerUnit);
    const detail::GroupQuant q = t.at(g);
    const int k = BitsOf(p, g);
    UniformStream uniform(rounding.seed, rounding.step);
    uint8_t codes[kChunkCodes];
    float u[kChunkCodes];
    for (int64_t c0 = m_begin; c0 < m_end; c0 += kChunkCodes) {
      const int64_t n = std::min(kChunkCodes, m_end - c0);
      if (stochastic) {
        const auto first = static_cast<uint64_t>(g * codes_per_group + c0);
        for (int64_t r = 0; r < n; ++r) u[r] = uniform.At(first + static_cast<uint64_t>(r));
      }
      ForEachRun(c0, n, g, groups, inner, [&](int64_t at, int64_t done, int64_t len) {
        const T* src = x + at;
        uint8_t* dst = codes + done;
        if (stochastic) {
          const float* ur = u + done;
          for (int64_t r = 0; r < len; ++r) dst[r] = StochasticByte(E::Load(src[r]), q, ur[r]);
        } else {
          for (int64_t r = 0; r < len; ++r) {
            dst[r] = static_cast<uint8_t>(detail::NearestCode(E::Load(src[r]), q));
          }
        }
      });
      detail::PackCodeBytes(codes, n, k, packed + offsets[g] + (c0 / 8) * k);
    }
  }
}

template <DType D>
void UnpackCpu(const ExecContext& ctx, const GroupLayout& layout, const QuantParams& p,
               const GroupTable& t, const uint8_t* packed, const int64_t* offsets, void* y_raw) {
  using E = detail::HostElement<D>;
  using T = typename E::Storage;
  T* y = static_cast<T*>(y_raw);
  const int64_t groups = layout.groups, inner = layout.inner;
  const int64_t codes_per_group = layout.per_group();
  const int threads = detail::CpuThreads(ctx);
  const bool parallel = layout.numel() >= (1 << 15);

  if (inner == 1) {
    const int64_t tiles = (layout.outer + 7) / 8;
    const float *sc = t.scale.data(), *off = t.offset.data(), *lo = t.lo.data();
#pragma omp parallel num_threads(threads) if (parallel)
    {
      std::vector<uint8_t> codes(8 * groups);
#pragma omp for schedule(static)
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t row0 = tile * 8;
        const int64_t rows = std::min<int64_t>(8, layout.outer - row0);
        for (int64_t g = 0; g < groups; ++g) {
          const int k = BitsOf(p, g);
          const uint64_t mask = (uint64_t{1} << k) - 1;
          const uint64_t word = LoadBytes(packed + offsets[g] + tile * k, (rows * k + 7) / 8);
          for (int r = 0; r < 8; ++r)
            codes[r * groups + g] = static_cast<uint8_t>((word >> (r * k)) & mask);
        }
        for (int64_t r = 0; r < rows; ++r) {
          T* yr = y + (row0 + r) * groups;
          const uint8_t* cr = codes.data() + r * groups;
          for (int64_t g = 0; g < groups; ++g) {
            yr[g] = E::Store((static_cast<float>(cr[g]) + lo[g]) * sc[g] + off[g]);
          }
        }
      }
    }
    return;
  }

  const int64_t units_per_group = (codes_per_group + kCodesPerUnit - 1) / kCodesPerUnit;
  const int64_t units = groups * units_per_group;
#pragma omp parallel for num_threads(threads) schedule(static) if (parallel)
  for (int64_t unit = 0; unit < units; ++unit) {
    const int64_t g = unit / units_per_group;
    const int64_t m_begin = (unit % units_per_group) * kCodesPerUnit;
    const int64_t m_end = std::min(codes_per_group, m_begin + kCodesPerUnit);
    const detail::GroupQuant q = t.at(g);
    const int k = BitsOf(p, g);
    uint8_t codes[kChunkCodes];
    for (int64_t c0 = m_begin; c0 < m_end; c0 += kChunkCodes) {
      const int64_t n = std::min(kChunkCodes, m_end - c0);
      detail::UnpackCodeBytes(packed + offsets[g] + (c0 / 8) * k, n, k, codes);
      ForEachRun(c0, n, g, groups, inner, [&](int64_t at, int64_t done, int64_t len) {
        T* dst = y + at;
        const uint8_t* src = codes + done;
        for (int64_t r = 0; r < len; ++r) dst[r] = E::Store(DequantByte(src[r], q));
      });
    }
  }
}

absl::Status CheckPackArgs(const GroupLayout& layout, const QuantParams& params,
                           const int64_t* group_offsets, const void* data, const void* packed) {
  SPLITQ_RETURN_IF_ERROR(ValidateQuantParams(params, layout));
  if (layout.numel() > 0 && (data == nullptr || packed == nullptr || group_offsets == nullptr)) {
    return absl::InvalidArgumentError("null pointer");
  }
  return absl::OkStatus();
}

absl::Status CheckHostBits(const GroupLayout& layout, const QuantParams& params) {
  for (int64_t g = 0; params.bits != nullptr && g < layout.groups; ++g) {
    if (params.bits[g] < 1 || params.bits[g] > 8) {
      return absl::InvalidArgumentError(absl::StrCat(
          "group ", g, " has bit width ", static_cast<int>(params.bits[g]), ", outside 1..8"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status PackedOffsets(absl::Span<const uint8_t> bits, int64_t codes_per_group,
                           absl::Span<int64_t> offsets) {
  if (offsets.size() != bits.size() + 1) {
    return absl::InvalidArgumentError("offsets must have one entry more than bits");
  }
  if (codes_per_group < 0) return absl::InvalidArgumentError("negative code count");
  if (codes_per_group > std::numeric_limits<int64_t>::max() / 8) {
    return absl::InvalidArgumentError("code count overflows the packed size");
  }
  int64_t total = 0;
  for (size_t g = 0; g < bits.size(); ++g) {
    if (bits[g] < 1 || bits[g] > 8) {
      return absl::InvalidArgumentError(absl::StrCat("group ", g, " has bit width ",
                                                     static_cast<int>(bits[g]), ", outside 1..8"));
    }
    offsets[g] = total;
    const int64_t segment = PackedGroupBytes(codes_per_group, bits[g]);
    if (total > std::numeric_limits<int64_t>::max() - segment) {
      return absl::InvalidArgumentError("packed size overflows int64");
    }
    total += segment;
  }
  offsets[bits.size()] = total;
  return absl::OkStatus();
}

absl::Status QuantizePack(const ExecContext& ctx, DType dtype, const GroupLayout& layout,
                          const QuantParams& params, const RoundingSpec& rounding, const void* x,
                          const int64_t* group_offsets, uint8_t* packed, int64_t packed_bytes) {
  SPLITQ_RETURN_IF_ERROR(CheckPackArgs(layout, params, group_offsets, x, packed));
  if (layout.numel() == 0) return absl::OkStatus();
  if (ctx.device == Device::kCuda) {
    SPLITQ_CUDA_OR_ERROR("QuantizePack",
                         cuda::QuantizePack(ctx.stream, dtype, layout, params, rounding, x,
                                            group_offsets, packed, packed_bytes));
  }
  SPLITQ_RETURN_IF_ERROR(CheckHostBits(layout, params));
  if (group_offsets[layout.groups] != packed_bytes) {
    return absl::InvalidArgumentError("packed_bytes does not match group_offsets");
  }
  const GroupTable table(params, layout.groups);
  return detail::DispatchDType(dtype, [&](auto tag) {
    PackCpu<decltype(tag)::value>(ctx, layout, params, table, rounding, x, group_offsets, packed);
  });
}

absl::Status UnpackDequantize(const ExecContext& ctx, DType dtype, const GroupLayout& layout,
                              const QuantParams& params, const uint8_t* packed,
                              int64_t packed_bytes, const int64_t* group_offsets, void* y) {
  SPLITQ_RETURN_IF_ERROR(CheckPackArgs(layout, params, group_offsets, y, packed));
  if (layout.numel() == 0) return absl::OkStatus();
  if (ctx.device == Device::kCuda) {
    SPLITQ_CUDA_OR_ERROR("UnpackDequantize",
                         cuda::UnpackDequantize(ctx.stream, dtype, layout, params, packed,
                                                packed_bytes, group_offsets, y));
  }
  SPLITQ_RETURN_IF_ERROR(CheckHostBits(layout, params));
  if (group_offsets[layout.groups] != packed_bytes) {
    return absl::InvalidArgumentError("packed_bytes does not match group_offsets");
  }
  const GroupTable table(params, layout.groups);
  return detail::DispatchDType(dtype, [&](auto tag) {
    UnpackCpu<decltype(tag)::value>(ctx, layout, params, table, packed, group_offsets, y);
  });
}

namespace detail {

void PackCodeBytes(const uint8_t* codes, int64_t n, int k, uint8_t* dst) {
  if (k == 8) {
    std::copy(codes, codes + n, dst);
    return;
  }
  if (k == 4) {
    const int64_t pairs = n / 2;
    for (int64_t j = 0; j < pairs; ++j) {
      dst[j] = static_cast<uint8_t>(codes[2 * j] | (codes[2 * j + 1] << 4));
    }
    if (n & 1) dst[pairs] = codes[n - 1];
    return;
  }
  for (int64_t m0 = 0; m0 < n; m0 += 8) {
    const int64_t len = std::min<int64_t>(8, n - m0);
    uint64_t word = 0;
    for (int64_t r = 0; r < len; ++r) word |= static_cast<uint64_t>(codes[m0 + r]) << (r * k);
    StoreBytes(word, dst + (m0 / 8) * k, (len * k + 7) / 8);
  }
}

void UnpackCodeBytes(const uint8_t* src, int64_t n, int k, uint8_t* codes) {
  if (k == 8) {
    std::copy(src, src + n, codes);
    return;
  }
  if (k == 4) {
    const int64_t pairs = n / 2;
    for (int64_t j = 0; j < pairs; ++j) {
      codes[2 * j] = src[j] & 0xf;
      codes[2 * j + 1] = src[j] >> 4;
    }
    if (n & 1) codes[n - 1] = src[pairs] & 0xf;
    return;
  }
  const uint64_t mask = (uint64_t{1} << k) - 1;
  for (int64_t m0 = 0; m0 < n; m0 += 8) {
    const int64_t len = std::min<int64_t>(8, n - m0);
    const uint64_t word = LoadBytes(src + (m0 / 8) * k, (len * k + 7) / 8);
    for (int64_t r = 0; r < len; ++r) {
      codes[m0 + r] = static_cast<uint8_t>((word >> (r * k)) & mask);
    }
  }
}

}  // namespace detail
}  // namespace splitq::kernels
