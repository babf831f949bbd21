// splitq quant: entropy coding of a frame's packed codes (rANS, a static table per group).
//
// A frame's payload (kernels/pack.h layout: one segment of k_g-bit codes per group) is coded
// group by group. Each group becomes, whichever is smallest:
//   stored     its segment as it is (what an incompressible group costs: one byte more);
//   constant   the one code every element of the group has (two bytes);
//   rANS       a frequency table of its codes (normalized to 2^L, L about log2 M) and a byte-wise
//   rANS
//              stream (two interleaved 32-bit states) of its M codes, in element order;
//   shared     the same with the frame's shared table for its bit width (built from all the
//              groups of that width, finer: L about log2 of all their codes), when that
//              costs less than a table of its own.
// A coded payload is never more than the packed one plus one byte per group and a two-byte
// header (MaxCodedPayloadBytes). Decoding holds the packed payload, the coded one, and per
// thread one table and one group's codes: memory does not grow with what the tables claim.
// docs/wire-format.md ("Entropy-coded payload") gives every byte; the frame says it is coded
// with flags bit 1.
//
// The coder's tables are static per group and frame, so its size is close to the order-0
// entropy of each group's codes (quant::MeasureCodeEntropy) plus the tables: CodedPayload
// returns that entropy too, measured from the same histograms.
//
// Decoding trusts nothing: every table is checked (symbols inside the group's 2^k codes,
// frequencies summing to exactly 2^L), every stream is read within its declared length, and a
// group's stream must end exactly at its end in the coder's initial state. Any failure is
// INVALID_ARGUMENT naming the group. Groups are coded and decoded on up to
// ExecContext::cpu_threads threads (0: OpenMP's default).
#pragma once

#include <array>
#include <cstdint>
#include <limits>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/common.h"

namespace splitq::quant {

// The first byte of a coded payload.
inline constexpr uint8_t kCodingVersion = 1;

// The largest coded payload a packed payload of `packed_bytes` in `groups` groups may become:
// every group stored (one mode byte each) plus the two-byte header.
inline int64_t MaxCodedPayloadBytes(int64_t packed_bytes, int64_t groups) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  return packed_bytes > kMax - 2 - groups ? kMax : packed_bytes + groups + 2;
}

struct CodedPayload {
  std::vector<uint8_t> bytes;  // the coded payload
  double entropy_bits = 0;     // order-0 entropy of the codes, one histogram per group (total)
  // Each group's own bytes in `bytes` (its mode byte, own table, length and stream); the
  // header and the shared tables are in none of them.
  std::vector<int64_t> group_bytes;
};

// Codes `packed` (the payload of a frame with `layout` and per-group `bits`, each 1..8; its
// size must be what they imply). INVALID_ARGUMENT on a size or bit width that does not match.
absl::StatusOr<CodedPayload> EntropyCode(absl::Span<const uint8_t> packed,
                                         const kernels::GroupLayout& layout,
                                         absl::Span<const uint8_t> bits,
                                         const kernels::ExecContext& cpu = {});

// Decodes a coded payload back into the packed payload (`packed` is resized to the size
// `layout` and `bits` imply, at most 2^31 bytes per group are handled as for packed frames).
// INVALID_ARGUMENT: a coded payload that is not exactly what EntropyCode's format allows.
absl::Status EntropyDecode(absl::Span<const uint8_t> coded, const kernels::GroupLayout& layout,
                           absl::Span<const uint8_t> bits, std::vector<uint8_t>* packed,
                           const kernels::ExecContext& cpu = {});

namespace internal {
// rANS symbol encoding with a reciprocal instead of a division (exposed for the test that
// checks it against the division on every frequency).
struct RansSymbol {
  uint32_t x_max = 0, rcp = 0, bias = 0, cmpl = 0, shift = 0;
};
RansSymbol MakeRansSymbol(uint32_t start, uint32_t freq, int prob_bits);
inline uint32_t RansStep(uint32_t x, const RansSymbol& s) {
  const uint32_t q = static_cast<uint32_t>((static_cast<uint64_t>(x) * s.rcp) >> s.shift);
  return x + s.bias + q * s.cmpl;
}
// The m codes of one group's k-bit segment (kernels/pack.h layout), one per byte.
void UnpackCodes(const uint8_t* segment, int64_t m, int k, uint8_t* codes);
// Adds the byte values of p[0..n) to `counts` (four interleaved histograms, so that runs of
// one value do not serialize the increments).
void AddByteHistogram(const uint8_t* p, int64_t n, std::array<int64_t, 256>* counts);
// Frequencies summing to 2^prob_bits, at least 1 for every code that occurs (counts sum > 0).
std::vector<uint32_t> NormalizeCounts(absl::Span<const int64_t> counts, int prob_bits);
}  // namespace internal

}  // namespace splitq::quant
