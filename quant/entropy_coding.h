// splitq quant: entropy coding of a frame's packed codes (rANS, static tables per group).
//
// A frame's payload (kernels/pack.h layout: one segment of k_g-bit codes per group) is coded
// group by group (docs/wire-format.md, "Entropy-coded payload", gives every byte). Version 2,
// which EntropyCode writes, takes the groups in runs (a run holds at least 2^16 codes) and
// codes each group, whichever is smallest, as:
//   stored     its segment as it is (one byte more than packed);
//   constant   the one code every element of the group has (two bytes);
//   own        a frequency table of its codes (normalized to 2^L, L about log2 M), in bits;
//   shared     the frame's shared table for its bit width (built from all the groups of that
//              width, finer: L about log2 of all their codes), when that costs less;
//   geometric  (codes of at most 5 bits) a two-sided geometric law, 3 bytes: a centre code and
//              a decay rate each side, its table built in integer arithmetic;
// the own, shared and geometric groups of a run in one byte-wise rANS stream with four
// interleaved 32-bit states, in element order, group after group. Version 1 (a stream with two
// states per group, tables in bytes, no geometric tables) is still decoded.
// A coded payload is never more than the packed one plus one byte per group and a two-byte
// header (MaxCodedPayloadBytes). Decoding holds the packed payload, the coded one, and per
// thread one table and one group's codes: memory does not grow with what the tables claim.
// The frame says it is coded with flags bit 1.
//
// The tables are static per group and frame, so the size is close to the order-0 entropy of
// each group's codes (quant::MeasureCodeEntropy) plus the tables: CodedPayload returns that
// entropy too, measured from the same histograms.
//
// Decoding trusts nothing: every table is checked (symbols inside the group's 2^k codes,
// frequencies summing to exactly 2^L, padding bits zero), every stream is read within its
// declared length, and a stream must end exactly at its end in the coder's initial states.
// Any failure is INVALID_ARGUMENT naming the group. Groups (version 1) or runs (version 2) are
// coded and decoded on up to ExecContext::cpu_threads threads (0: OpenMP's default).
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

// The first byte of a coded payload: the version EntropyCode writes. EntropyDecode reads
// versions 1 and 2.
inline constexpr uint8_t kCodingVersion = 2;

// The largest coded payload a packed payload of `packed_bytes` in `groups` groups may become:
// every group stored (one mode byte each) plus the two-byte header.
inline int64_t MaxCodedPayloadBytes(int64_t packed_bytes, int64_t groups) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  return packed_bytes > kMax - 2 - groups ? kMax : packed_bytes + groups + 2;
}

struct CodedPayload {
  std::vector<uint8_t> bytes;  // the coded payload
  double entropy_bits = 0;     // order-0 entropy of the codes, one histogram per group (total)
  // Each group's share of `bytes`: its mode byte and what follows it, the stream bytes the
  // coder emitted while it coded this group's codes, and an even share of its run's stream
  // length and final states. The header and the shared tables are in none of them.
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
// EntropyCode as it wrote coding version 1 (a stream per group, byte-coded tables, no
// geometric tables), for the tests of the version-1 decoder.
absl::StatusOr<CodedPayload> EntropyCodeVersion1(absl::Span<const uint8_t> packed,
                                                 const kernels::GroupLayout& layout,
                                                 absl::Span<const uint8_t> bits,
                                                 const kernels::ExecContext& cpu = {});
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
