// CPU path of pack.h, and the device dispatch.
//
// Channels last (inner == 1, e.g. [N, C] on axis 1): tiles of 8 rows. Codes of a tile are
// computed row by row (vectorised across channels) into a small per-thread table, then
// each channel's 8 codes become exactly k_c bytes of its segment. Otherwise the codes of a
// group are walked in runs of 8 (contiguous in memory whenever inner % 8 == 0).
#include "kernels/pack.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
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

// The position in x of code m, m+1, ... of group g in a [outer, groups, inner] layout:
// x[(o * groups + g) * inner + i] with m = o * inner + i, advanced without dividing.
class ElementWalker {
 public:
  ElementWalker(int64_t m, int64_t inner, int64_t groups, int64_t g)
      : inner_(inner),
        stride_(groups * inner),
        i_(m % inner),
        base_((m / inner) * groups * inner + g * inner) {}
  int64_t index() const { return base_ + i_; }
  void Next() {
    if (++i_ == inner_) {
      i_ = 0;
      base_ += stride_;
    }
  }

 private:
  int64_t inner_, stride_, i_, base_;
};

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
    // Code m of group g is x[((m / inner) * groups + g) * inner + m % inner]: walk (o, i)
    // incrementally, as a division per element costs more than the rest of the work.
    ElementWalker walk(m_begin, inner, groups, g);
    for (int64_t m0 = m_begin; m0 < m_end; m0 += 8) {
      const int64_t n = std::min<int64_t>(8, m_end - m0);
      uint64_t word = 0;
      for (int64_t r = 0; r < n; ++r, walk.Next()) {
        const int64_t m = m0 + r;
        const float value = E::Load(x[walk.index()]);
        const uint32_t code =
            stochastic ? detail::StochasticCode(
                             value, q, uniform.At(static_cast<uint64_t>(g * codes_per_group + m)))
                       : detail::NearestCode(value, q);
        word |= static_cast<uint64_t>(code) << (r * k);
      }
      StoreBytes(word, packed + offsets[g] + (m0 / 8) * k, (n * k + 7) / 8);
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
    const uint64_t mask = (uint64_t{1} << k) - 1;
    ElementWalker walk(m_begin, inner, groups, g);
    for (int64_t m0 = m_begin; m0 < m_end; m0 += 8) {
      const int64_t n = std::min<int64_t>(8, m_end - m0);
      const uint64_t word = LoadBytes(packed + offsets[g] + (m0 / 8) * k, (n * k + 7) / 8);
      for (int64_t r = 0; r < n; ++r, walk.Next()) {
        y[walk.index()] =
            E::Store(detail::DequantCode(static_cast<uint32_t>((word >> (r * k)) & mask), q));
      }
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

}  // namespace splitq::kernels
