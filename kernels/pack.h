// splitq kernels: fused mixed-bit quantize+pack and unpack+dequantize (the wire payload).
//
// Packed layout (docs/wire-format.md has it byte by byte). The tensor is viewed as
// [outer, groups, inner] (common.h). Group g owns M = outer * inner codes, taken in order
// m = o * inner + j, each k_g bits wide and stored as the unsigned value q - qmin
// (0 .. 2^k_g - 1). The codes of one group form a little-endian bit stream: code m occupies
// bits [m * k_g, (m + 1) * k_g) of the group's segment, bit b of the segment being bit
// (b % 8) of byte b / 8. So every 8 consecutive codes fill exactly k_g bytes. A segment is
// ceil(M * k_g / 8) bytes (the last byte zero-padded) and segments follow each other in
// group order with no gaps. Group g starts at byte offsets[g]; offsets[groups] is the total.
//
// Rounding is to nearest (ties to even) or stochastic. Stochastic rounding adds
// u in [0, 1) to the clamped, offset value before truncation; u comes from Philox4x32-10
// keyed by (seed, step, element), element being the code's index in packed order
// g * M + m (see philox.h), so the CPU and CUDA paths give the same codes.
//
// On CUDA, without a zero point (every wire frame), rounding to nearest and dequantizing use
// float adds and integer adds in place of rounding and conversion instructions (pack.cu,
// `Codes`); the results are the same bit for bit. SPLITQ_KERNELS_CONVERT=1 in the
// environment turns that off, to measure the two side by side in one build.
#pragma once

#include "kernels/common.h"

namespace splitq::kernels {

// Bytes of one group's segment: ceil(codes * bits / 8).
inline int64_t PackedGroupBytes(int64_t codes, int bits) { return (codes * bits + 7) / 8; }

// Host helper: offsets[g] = byte where group g's segment starts, offsets[groups] = total.
// `bits` has one entry per group (1..8); `offsets` must have groups + 1 entries.
// Errors: a bit width outside 1..8, a size overflowing int64, wrong span sizes.
absl::Status PackedOffsets(absl::Span<const uint8_t> bits, int64_t codes_per_group,
                           absl::Span<int64_t> offsets);

enum class Rounding : uint8_t { kNearest = 0, kStochastic = 1 };

struct RoundingSpec {
  Rounding mode = Rounding::kNearest;
  uint64_t seed = 0;  // Philox key (stochastic only)
  uint64_t step = 0;  // training step, upper half of the Philox counter (stochastic only)
};

// Quantizes x (dtype, layout.numel() elements) with `params` and writes the packed stream.
// `group_offsets` (groups + 1 entries, on the kernel's device) come from PackedOffsets()
// for the same bits; `packed_bytes` must equal group_offsets[groups] (checked on the host
// side by the caller that computed them; the kernel trusts it). Padding bits are zero.
absl::Status QuantizePack(const ExecContext& ctx, DType dtype, const GroupLayout& layout,
                          const QuantParams& params, const RoundingSpec& rounding, const void* x,
                          const int64_t* group_offsets, uint8_t* packed, int64_t packed_bytes);

// Inverse of QuantizePack: y = (code + qmin - z) * s + beta, written as `dtype`.
absl::Status UnpackDequantize(const ExecContext& ctx, DType dtype, const GroupLayout& layout,
                              const QuantParams& params, const uint8_t* packed,
                              int64_t packed_bytes, const int64_t* group_offsets, void* y);

}  // namespace splitq::kernels
