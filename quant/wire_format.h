// splitq quant: the boundary frame and its byte encoding, without torch.
//
// A Frame carries one quantized tensor across the split (an activation going up or a
// gradient coming down): its shape, dtype and grouping, the per-group bit map (only when it
// changed), the per-group scales and offsets, the packed codes (kernels/pack.h layout) and
// a CRC32C. docs/wire-format.md describes every byte, so that another implementation can
// decode it.
//
// Decoding never trusts a size it has not checked against the bytes it holds: ParseFrame
// allocates at most the size of its input, and ValidateFrame checks a parsed frame
// completely (bit widths, finite scales, payload size implied by shape and bits, CRC)
// before DecodePayload writes a single output element.
//
// The quantizer on the wire is the unsigned, offset form of kernels/common.h:
//   code q in 0 .. 2^k_g - 1,   x_hat = q * scale_g + offset_g.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/common.h"
#include "kernels/pack.h"

namespace splitq::quant {

enum class FrameKind : uint8_t { kActivation = 1, kGradient = 2 };

inline constexpr uint32_t kFrameMagic = 0x31465153;  // "SQF1" read as little-endian u32
inline constexpr int kMaxFrameRank = 8;

struct Frame {
  uint64_t session_id = 0;  // sender's session
  uint64_t step = 0;        // training step (steps)
  FrameKind kind = FrameKind::kActivation;
  kernels::DType dtype = kernels::DType::kFloat32;  // dtype of the decoded tensor
  std::vector<int64_t> shape;                       // decoded tensor shape (elements)
  int32_t group_axis = 1;        // axis whose entries each have their own bits/scale; -1: one group
  uint32_t bitmap_version = 0;   // bumps whenever the bit map changes
  std::vector<uint8_t> bits;     // [groups] bits per group (1..8); empty: unchanged since the
                                 // last frame that carried `bitmap_version`
  std::vector<float> scales;     // [groups] step size, x units, finite and > 0
  std::vector<float> offsets;    // [groups] value of code 0, x units, finite
  std::vector<uint8_t> payload;  // packed codes, kernels/pack.h layout; when `coded`, those
                                 // codes entropy-coded (quant/entropy_coding.h)
  bool coded = false;            // flags bit 1: the payload is entropy-coded
  uint32_t crc32c = 0;           // CRC32C of the canonical encoding of every field above
};

// Bounds a receiver enforces before it allocates. Every limit is in elements or bytes.
struct FrameLimits {
  int64_t max_elements = int64_t{1} << 28;       // decoded tensor elements (1 GiB as fp32)
  int64_t max_payload_bytes = int64_t{1} << 30;  // packed payload bytes
};

// The group layout a frame's shape and group_axis imply. Besides rank <= kMaxFrameRank, no
// negative dimension and group_axis -1 or in 0..rank-1, the product of the non-zero
// dimensions must fit in int64 (so that an empty tensor's partial products do too).
absl::StatusOr<kernels::GroupLayout> FrameLayout(const Frame& frame);

// CRC32C over the canonical encoding of every field except crc32c itself (the bytes
// SerializeFrame writes before the trailing CRC).
uint32_t ComputeFrameCrc(const Frame& frame);

// Sets frame->crc32c = ComputeFrameCrc(*frame). Call after the last change to a frame.
void SealFrame(Frame* frame);

// The frame as bytes (docs/wire-format.md), ending with frame.crc32c as stored.
std::string SerializeFrame(const Frame& frame);

// Parses bytes written by SerializeFrame. Checks structure only (magic, sizes against the
// bytes present, rank, enum values); call ValidateFrame for the content. Errors are
// INVALID_ARGUMENT naming the field. Only the canonical encoding is accepted (no trailing
// bytes, no bit-map flag with zero groups), so SerializeFrame(parsed) == bytes.
absl::StatusOr<Frame> ParseFrame(absl::Span<const uint8_t> bytes);

// The order-0 entropy of a frame's codes (MeasureCodeEntropy, EntropyCodeFrame).
struct CodeEntropy {
  int64_t elements = 0;
  double bits = 0;  // total over the frame
  // EntropyCodeFrame only: the bits each group takes in the payload as it goes (coded, or
  // packed when coding did not pay), the coded header and shared tables spread over the groups
  // in proportion; they sum to the payload's bits. Empty from MeasureCodeEntropy.
  std::vector<float> group_bits;
};

// Full check of a frame before decoding. `known_bits` is the receiver's current bit map
// for `known_version` (nullptr when it has none); a frame without bits must carry that
// version. Returns the bit map to decode with.
//   INVALID_ARGUMENT: bad shape or axis, bits outside 1..8, bit-map length != groups,
//                     scales/offsets of the wrong length or not finite, scale <= 0,
//                     payload size != the size implied by shape and bits (coded: above
//                     MaxCodedPayloadBytes of that size), CRC mismatch. A coded payload's
//                     own structure is checked when it is decoded (DecodePayload,
//                     UncodedPayload), with the same code.
//   FAILED_PRECONDITION: no bits and no matching known bit map.
//   RESOURCE_EXHAUSTED: more elements or payload bytes than `limits` allow.
absl::StatusOr<std::vector<uint8_t>> ValidateFrame(const Frame& frame,
                                                   const std::vector<uint8_t>* known_bits,
                                                   uint32_t known_version,
                                                   const FrameLimits& limits);

// Decodes a frame that ValidateFrame accepted into `out` (host memory, numel elements of
// frame.dtype), using `bits` as returned by ValidateFrame. A coded frame is entropy-decoded
// first (INVALID_ARGUMENT when its coded payload is malformed; nothing written then), unless
// `packed` gives its packed payload (UncodedPayload's).
absl::Status DecodePayload(const Frame& frame, absl::Span<const uint8_t> bits, void* out,
                           const kernels::ExecContext& cpu = {},
                           const std::vector<uint8_t>* packed = nullptr);

// Entropy-codes the payload of a frame that is not coded yet, in place, when that makes it
// smaller (quant/entropy_coding.h), and sets `coded`; `bits` is the frame's full bit map (the
// frame may omit it). Returns the order-0 entropy of the codes (as MeasureCodeEntropy), which
// the coder measures anyway. Call SealFrame after it.
absl::StatusOr<CodeEntropy> EntropyCodeFrame(Frame* frame, absl::Span<const uint8_t> bits,
                                             const kernels::ExecContext& cpu = {});

// The packed payload of a frame: the payload itself, or a coded frame's payload decoded.
// Checks what bounds memory (layout, bits, payload size) and the coded structure; not the
// dtype, scales or offsets (ValidateFrame does).
absl::StatusOr<std::vector<uint8_t>> UncodedPayload(const Frame& frame,
                                                    absl::Span<const uint8_t> bits,
                                                    const kernels::ExecContext& cpu = {});

// The order-0 entropy of a frame's codes, each group with its own histogram (one frequency
// table per channel: what a static per-group entropy coder can reach, its tables not counted).
// `bits` as for DecodePayload. Returns the total over the frame in bits: sum over groups g of
// M * H_g, H_g = -sum_q p_q log2 p_q over the 2^k_g codes' frequencies in the group. Divide by
// numel for bits per element. A frame DecodePayload accepts is accepted here (same checks). A
// coded frame is decoded first unless `packed` gives its packed payload (UncodedPayload's).
absl::StatusOr<CodeEntropy> MeasureCodeEntropy(const Frame& frame, absl::Span<const uint8_t> bits,
                                               const std::vector<uint8_t>* packed = nullptr);

// The content rules for a frame about to be built (the ones ValidateFrame applies to shape,
// group_axis, bits, scales and offsets), with the same INVALID_ARGUMENT messages. Returns
// the group layout. EncodeFrame calls it; so does a sender that packs on a device.
absl::StatusOr<kernels::GroupLayout> ValidateEncodeArguments(absl::Span<const int64_t> shape,
                                                             int32_t group_axis,
                                                             absl::Span<const uint8_t> bits,
                                                             absl::Span<const float> scales,
                                                             absl::Span<const float> offsets);

// Builds a frame on the host from `x` (numel elements of `dtype`, host memory): packs with
// the given per-group bits/scales/offsets and rounding. Fills shape, dtype, group_axis,
// bits, scales, offsets and payload; the caller sets session_id, step, kind and
// bitmap_version (and clears `bits` when the receiver already holds that version), then
// calls SealFrame. Errors: the same content rules ValidateFrame applies.
absl::StatusOr<Frame> EncodeFrame(const void* x, kernels::DType dtype,
                                  absl::Span<const int64_t> shape, int32_t group_axis,
                                  absl::Span<const uint8_t> bits, absl::Span<const float> scales,
                                  absl::Span<const float> offsets,
                                  const kernels::RoundingSpec& rounding,
                                  const kernels::ExecContext& cpu = {});

}  // namespace splitq::quant
