// The boundary frame's byte encoding (wire_format.h, docs/wire-format.md).
//
// Encoding, all integers and floats little-endian, no padding, in this order:
//   offset  size     field
//   0       4        u32 magic = kFrameMagic ("SQF1")
//   4       1        u8  version = 1
//   5       1        u8  kind (FrameKind: 1 activation, 2 gradient)
//   6       1        u8  dtype (kernels::DType: 0 float32, 1 bfloat16, 2 float16)
//   7       1        u8  rank R (0 .. kMaxFrameRank)
//   8       1        u8  flags (bit 0: bit map present; other bits zero)
//   9       3        u8[3] reserved, zero
//   12      4        u32 bitmap_version
//   16      8        u64 session_id
//   24      8        u64 step
//   32      4        i32 group_axis (-1: one group for the whole tensor)
//   36      8R       i64 shape[R]
//   36+8R   4        u32 G, the number of groups
//   ...     G        u8  bits[G]          (only when flags bit 0 is set)
//   ...     4G       f32 scales[G]
//   ...     4G       f32 offsets[G]
//   ...     8        u64 P, payload bytes
//   ...     P        u8  payload[P]       (kernels/pack.h layout)
//   ...     4        u32 CRC-32C of every preceding byte of the encoding
// ParseFrame accepts exactly the encodings SerializeFrame produces (canonical form), so
// ComputeFrameCrc of a parsed frame is the CRC of the bytes it was parsed from.
#include "quant/wire_format.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "quant/crc32c.h"
#include "quant/entropy_coding.h"

namespace splitq::quant {
namespace {

constexpr uint8_t kFrameVersion = 1;
constexpr uint8_t kFlagBitMap = 0x01;
constexpr uint8_t kFlagCoded = 0x02;
constexpr uint8_t kKnownFlags = kFlagBitMap | kFlagCoded;
constexpr size_t kFixedHeaderBytes = 36;  // magic .. group_axis

bool KnownKind(uint8_t v) {
  return v == static_cast<uint8_t>(FrameKind::kActivation) ||
         v == static_cast<uint8_t>(FrameKind::kGradient);
}
bool KnownDType(uint8_t v) {
  return v == static_cast<uint8_t>(kernels::DType::kFloat32) ||
         v == static_cast<uint8_t>(kernels::DType::kBFloat16) ||
         v == static_cast<uint8_t>(kernels::DType::kFloat16);
}

// ---- encoding ---------------------------------------------------------------------------

// Little-endian writer over a sink `void(const uint8_t*, size_t)`, buffered so that the CRC
// sink sees runs of bytes rather than single fields.
template <typename Sink>
class Encoder {
 public:
  explicit Encoder(Sink& sink) : sink_(sink) {}
  void U8(uint8_t v) { Le(v, 1); }
  void U32(uint32_t v) { Le(v, 4); }
  void U64(uint64_t v) { Le(v, 8); }
  void I32(int32_t v) { Le(static_cast<uint32_t>(v), 4); }
  void I64(int64_t v) { Le(static_cast<uint64_t>(v), 8); }
  void F32(float v) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    Le(u, 4);
  }
  void Raw(const uint8_t* p, size_t n) {
    Flush();
    if (n > 0) sink_(p, n);
  }
  void Flush() {
    if (n_ > 0) sink_(buf_, n_);
    n_ = 0;
  }

 private:
  void Le(uint64_t v, size_t bytes) {
    if (n_ + bytes > sizeof(buf_)) Flush();
    for (size_t b = 0; b < bytes; ++b) buf_[n_++] = static_cast<uint8_t>(v >> (8 * b));
  }
  Sink& sink_;
  uint8_t buf_[512];
  size_t n_ = 0;
};

// Every byte of the encoding before the trailing CRC.
template <typename Sink>
void EncodeBody(const Frame& f, Sink& sink) {
  Encoder<Sink> e(sink);
  e.U32(kFrameMagic);
  e.U8(kFrameVersion);
  e.U8(static_cast<uint8_t>(f.kind));
  e.U8(static_cast<uint8_t>(f.dtype));
  e.U8(static_cast<uint8_t>(f.shape.size()));
  e.U8(static_cast<uint8_t>((f.bits.empty() ? 0 : kFlagBitMap) | (f.coded ? kFlagCoded : 0)));
  e.U8(0);
  e.U8(0);
  e.U8(0);
  e.U32(f.bitmap_version);
  e.U64(f.session_id);
  e.U64(f.step);
  e.I32(f.group_axis);
  for (const int64_t d : f.shape) e.I64(d);
  e.U32(static_cast<uint32_t>(f.scales.size()));
  e.Raw(f.bits.data(), f.bits.size());
  for (const float s : f.scales) e.F32(s);
  for (const float o : f.offsets) e.F32(o);
  e.U64(static_cast<uint64_t>(f.payload.size()));
  e.Raw(f.payload.data(), f.payload.size());
  e.Flush();
}

size_t EncodedBytes(const Frame& f) {
  return kFixedHeaderBytes + 8 * f.shape.size() + 4 + f.bits.size() + 4 * f.scales.size() +
         4 * f.offsets.size() + 8 + f.payload.size() + 4;
}

// ---- parsing ----------------------------------------------------------------------------

// Little-endian reader that checks every read against the bytes left.
class Reader {
 public:
  explicit Reader(absl::Span<const uint8_t> in) : in_(in) {}
  size_t left() const { return in_.size() - pos_; }

  // OK when `bytes` more bytes are present; else the error naming `field`.
  absl::Status Need(const char* field, uint64_t bytes, const char* what = "needed") const {
    if (bytes <= static_cast<uint64_t>(left())) return absl::OkStatus();
    return absl::InvalidArgumentError(
        absl::StrCat("frame field '", field, "': ", bytes, " bytes ", what, ", ", left(), " left"));
  }
  uint64_t Le(size_t bytes) {  // caller has checked Need()
    uint64_t v = 0;
    for (size_t b = 0; b < bytes; ++b) v |= static_cast<uint64_t>(in_[pos_ + b]) << (8 * b);
    pos_ += bytes;
    return v;
  }
  absl::Status U8(const char* field, uint8_t* v) {
    SPLITQ_RETURN_IF_ERROR(Need(field, 1));
    *v = static_cast<uint8_t>(Le(1));
    return absl::OkStatus();
  }
  absl::Status U32(const char* field, uint32_t* v) {
    SPLITQ_RETURN_IF_ERROR(Need(field, 4));
    *v = static_cast<uint32_t>(Le(4));
    return absl::OkStatus();
  }
  absl::Status U64(const char* field, uint64_t* v) {
    SPLITQ_RETURN_IF_ERROR(Need(field, 8));
    *v = Le(8);
    return absl::OkStatus();
  }
  const uint8_t* Take(size_t bytes) {  // caller has checked Need()
    const uint8_t* p = in_.data() + pos_;
    pos_ += bytes;
    return p;
  }

 private:
  absl::Span<const uint8_t> in_;
  size_t pos_ = 0;
};

absl::Status FieldError(const char* field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("frame field '", field, "': ", what));
}

// ---- content rules ----------------------------------------------------------------------

// Layout for a shape and group_axis (-1: one group; else 0 <= axis < rank, per channel).
// Besides MakeGroupLayout's checks, the product of the non-zero dimensions must fit in
// int64 (so that every partial product of an empty tensor's shape does too).
absl::StatusOr<kernels::GroupLayout> LayoutFor(absl::Span<const int64_t> shape,
                                               int32_t group_axis) {
  if (shape.size() > static_cast<size_t>(kMaxFrameRank)) {
    return FieldError("rank",
                      absl::StrCat(shape.size(), " exceeds the maximum rank ", kMaxFrameRank));
  }
  const int rank = static_cast<int>(shape.size());
  int64_t nonzero_product = 1;
  for (int i = 0; i < rank; ++i) {
    const int64_t d = shape[i];
    if (d < 0) return FieldError("shape", absl::StrCat("dimension ", i, " is negative (", d, ")"));
    if (d == 0) continue;
    if (nonzero_product > std::numeric_limits<int64_t>::max() / d) {
      return FieldError("shape", "element count overflows int64");
    }
    nonzero_product *= d;
  }
  if (group_axis != -1 && (group_axis < 0 || group_axis >= rank)) {
    return FieldError("group_axis", absl::StrCat(group_axis, " is out of range for rank ", rank,
                                                 " (must be -1 or 0..", rank - 1, ")"));
  }
  return kernels::MakeGroupLayout(
      shape, group_axis == -1 ? kernels::Granularity::kTensor : kernels::Granularity::kChannel,
      group_axis);
}

absl::Status CheckBits(absl::Span<const uint8_t> bits, const char* field) {
  for (size_t g = 0; g < bits.size(); ++g) {
    if (bits[g] < 1 || bits[g] > 8) {
      return FieldError(field, absl::StrCat("group ", g, " has bit width ",
                                            static_cast<int>(bits[g]), ", outside 1..8"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckBitCount(size_t count, int64_t groups, const char* field) {
  if (static_cast<uint64_t>(count) != static_cast<uint64_t>(groups)) {
    return FieldError(field, absl::StrCat("bit-map length ", count, " does not match the ", groups,
                                          " groups of the shape"));
  }
  return absl::OkStatus();
}

absl::Status CheckScalesOffsets(absl::Span<const float> scales, absl::Span<const float> offsets,
                                int64_t groups) {
  if (static_cast<uint64_t>(scales.size()) != static_cast<uint64_t>(groups)) {
    return FieldError("scales", absl::StrCat(scales.size(), " entries for ", groups, " groups"));
  }
  if (static_cast<uint64_t>(offsets.size()) != static_cast<uint64_t>(groups)) {
    return FieldError("offsets", absl::StrCat(offsets.size(), " entries for ", groups, " groups"));
  }
  for (size_t g = 0; g < scales.size(); ++g) {
    if (!std::isfinite(scales[g]) || !(scales[g] > 0.0f)) {
      return FieldError("scales", absl::StrCat("group ", g, " has scale ", scales[g],
                                               "; scales must be finite and > 0"));
    }
    if (!std::isfinite(offsets[g])) {
      return FieldError("offsets", absl::StrCat("group ", g, " has offset ", offsets[g],
                                                "; offsets must be finite"));
    }
  }
  return absl::OkStatus();
}

// Byte offsets of the groups' segments for `layout` and `bits` (bits.size() == groups).
absl::StatusOr<std::vector<int64_t>> SegmentOffsets(const kernels::GroupLayout& layout,
                                                    absl::Span<const uint8_t> bits) {
  std::vector<int64_t> offsets(bits.size() + 1);
  const absl::Status status =
      kernels::PackedOffsets(bits, layout.per_group(), absl::MakeSpan(offsets));
  if (!status.ok()) return FieldError("payload", std::string(status.message()));
  return offsets;
}

// A packed payload has exactly the size the layout and bits imply; a coded one at most
// MaxCodedPayloadBytes of it (its own structure is checked when it is decoded).
absl::Status CheckPayloadSize(const Frame& frame, const kernels::GroupLayout& layout,
                              int64_t implied) {
  const auto actual = static_cast<uint64_t>(frame.payload.size());
  if (frame.coded) {
    if (layout.numel() == 0) {
      return FieldError("flags", "payload flagged coded, but the tensor is empty");
    }
    const int64_t most = MaxCodedPayloadBytes(implied, layout.groups);
    if (actual > static_cast<uint64_t>(most)) {
      return FieldError("payload", absl::StrCat(actual,
                                                " coded bytes, but a coded payload of this "
                                                "shape and bit map takes at most ",
                                                most));
    }
    return absl::OkStatus();
  }
  if (actual != static_cast<uint64_t>(implied)) {
    return FieldError("payload",
                      absl::StrCat(actual, " bytes, but the shape and bit map imply ", implied));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<kernels::GroupLayout> FrameLayout(const Frame& frame) {
  return LayoutFor(frame.shape, frame.group_axis);
}

uint32_t ComputeFrameCrc(const Frame& frame) {
  uint32_t crc = 0;
  auto sink = [&crc](const uint8_t* p, size_t n) { crc = Crc32cExtend(crc, p, n); };
  EncodeBody(frame, sink);
  return crc;
}

void SealFrame(Frame* frame) { frame->crc32c = ComputeFrameCrc(*frame); }

std::string SerializeFrame(const Frame& frame) {
  std::string out;
  out.reserve(EncodedBytes(frame));
  auto sink = [&out](const uint8_t* p, size_t n) {
    out.append(reinterpret_cast<const char*>(p), n);
  };
  EncodeBody(frame, sink);
  Encoder<decltype(sink)> e(sink);
  e.U32(frame.crc32c);
  e.Flush();
  return out;
}

absl::StatusOr<Frame> ParseFrame(absl::Span<const uint8_t> bytes) {
  Reader r(bytes);
  Frame f;
  uint32_t magic = 0;
  SPLITQ_RETURN_IF_ERROR(r.U32("magic", &magic));
  if (magic != kFrameMagic) {
    return FieldError("magic",
                      absl::StrCat("0x", absl::Hex(magic, absl::kZeroPad8), " is not \"SQF1\" (0x",
                                   absl::Hex(kFrameMagic, absl::kZeroPad8), ")"));
  }
  uint8_t version = 0, kind = 0, dtype = 0, rank = 0, flags = 0;
  SPLITQ_RETURN_IF_ERROR(r.U8("version", &version));
  if (version != kFrameVersion) {
    return FieldError("version",
                      absl::StrCat("unsupported version ", static_cast<int>(version),
                                   " (this decoder reads ", static_cast<int>(kFrameVersion), ")"));
  }
  SPLITQ_RETURN_IF_ERROR(r.U8("kind", &kind));
  if (!KnownKind(kind)) {
    return FieldError("kind", absl::StrCat("unknown frame kind ", static_cast<int>(kind)));
  }
  SPLITQ_RETURN_IF_ERROR(r.U8("dtype", &dtype));
  if (!KnownDType(dtype)) {
    return FieldError("dtype", absl::StrCat("unknown dtype ", static_cast<int>(dtype)));
  }
  SPLITQ_RETURN_IF_ERROR(r.U8("rank", &rank));
  if (rank > kMaxFrameRank) {
    return FieldError(
        "rank", absl::StrCat(static_cast<int>(rank), " exceeds the maximum rank ", kMaxFrameRank));
  }
  SPLITQ_RETURN_IF_ERROR(r.U8("flags", &flags));
  if ((flags & ~kKnownFlags) != 0) {
    return FieldError("flags", absl::StrCat("unknown flag bits 0x",
                                            absl::Hex(flags & ~kKnownFlags, absl::kZeroPad2)));
  }
  SPLITQ_RETURN_IF_ERROR(r.Need("reserved", 3));
  for (int i = 0; i < 3; ++i) {
    if (r.Le(1) != 0) return FieldError("reserved", absl::StrCat("byte ", i, " is not zero"));
  }
  f.kind = static_cast<FrameKind>(kind);
  f.dtype = static_cast<kernels::DType>(dtype);
  SPLITQ_RETURN_IF_ERROR(r.U32("bitmap_version", &f.bitmap_version));
  SPLITQ_RETURN_IF_ERROR(r.U64("session_id", &f.session_id));
  SPLITQ_RETURN_IF_ERROR(r.U64("step", &f.step));
  uint32_t axis = 0;
  SPLITQ_RETURN_IF_ERROR(r.U32("group_axis", &axis));
  f.group_axis = static_cast<int32_t>(axis);

  SPLITQ_RETURN_IF_ERROR(r.Need("shape", uint64_t{8} * rank));
  f.shape.resize(rank);
  for (auto& d : f.shape) d = static_cast<int64_t>(r.Le(8));

  uint32_t groups = 0;
  SPLITQ_RETURN_IF_ERROR(r.U32("groups", &groups));
  if ((flags & kFlagBitMap) != 0) {
    if (groups == 0) return FieldError("flags", "bit map flagged present, but there are 0 groups");
    SPLITQ_RETURN_IF_ERROR(r.Need("bits", groups, "claimed"));
    const uint8_t* p = r.Take(groups);
    f.bits.assign(p, p + groups);
  }
  if ((flags & kFlagCoded) != 0) {
    if (groups == 0) return FieldError("flags", "payload flagged coded, but there are 0 groups");
    f.coded = true;
  }
  const uint64_t float_bytes = uint64_t{4} * groups;  // <= 2^34, no overflow
  SPLITQ_RETURN_IF_ERROR(r.Need("scales", float_bytes, "claimed"));
  f.scales.resize(groups);
  for (auto& s : f.scales) {
    const uint32_t u = static_cast<uint32_t>(r.Le(4));
    std::memcpy(&s, &u, sizeof(s));
  }
  SPLITQ_RETURN_IF_ERROR(r.Need("offsets", float_bytes, "claimed"));
  f.offsets.resize(groups);
  for (auto& o : f.offsets) {
    const uint32_t u = static_cast<uint32_t>(r.Le(4));
    std::memcpy(&o, &u, sizeof(o));
  }
  uint64_t payload_bytes = 0;
  SPLITQ_RETURN_IF_ERROR(r.U64("payload_bytes", &payload_bytes));
  SPLITQ_RETURN_IF_ERROR(r.Need("payload", payload_bytes, "claimed"));
  const uint8_t* p = r.Take(static_cast<size_t>(payload_bytes));
  f.payload.assign(p, p + payload_bytes);
  SPLITQ_RETURN_IF_ERROR(r.U32("crc32c", &f.crc32c));
  if (r.left() != 0) {
    return FieldError("crc32c", absl::StrCat(r.left(), " trailing bytes after the CRC"));
  }
  return f;
}

absl::StatusOr<std::vector<uint8_t>> ValidateFrame(const Frame& frame,
                                                   const std::vector<uint8_t>* known_bits,
                                                   uint32_t known_version,
                                                   const FrameLimits& limits) {
  // Structure.
  if (!KnownKind(static_cast<uint8_t>(frame.kind))) {
    return FieldError("kind", absl::StrCat("unknown frame kind ", static_cast<int>(frame.kind)));
  }
  if (!KnownDType(static_cast<uint8_t>(frame.dtype))) {
    return FieldError("dtype", absl::StrCat("unknown dtype ", static_cast<int>(frame.dtype)));
  }
  SPLITQ_ASSIGN_OR_RETURN(const kernels::GroupLayout layout, FrameLayout(frame));

  // Limits.
  if (layout.numel() > limits.max_elements) {
    return absl::ResourceExhaustedError(absl::StrCat("frame field 'shape': ", layout.numel(),
                                                     " elements exceed the receiver's limit of ",
                                                     limits.max_elements));
  }
  if (static_cast<uint64_t>(frame.payload.size()) >
      static_cast<uint64_t>(std::max<int64_t>(limits.max_payload_bytes, 0))) {
    return absl::ResourceExhaustedError(
        absl::StrCat("frame field 'payload': ", frame.payload.size(),
                     " bytes exceed the receiver's limit of ", limits.max_payload_bytes));
  }

  // Bit map: the frame's own, or the receiver's for the frame's bitmap_version.
  const std::vector<uint8_t>* bits = &frame.bits;
  if (frame.bits.empty() && layout.groups > 0) {
    if (known_bits == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("frame carries no bit map and the receiver holds none (frame's "
                       "bitmap_version ",
                       frame.bitmap_version, ")"));
    }
    if (known_version != frame.bitmap_version) {
      return absl::FailedPreconditionError(
          absl::StrCat("frame carries no bit map and its bitmap_version ", frame.bitmap_version,
                       " is not the receiver's (", known_version, ")"));
    }
    bits = known_bits;
    SPLITQ_RETURN_IF_ERROR(CheckBitCount(bits->size(), layout.groups, "bits (known map)"));
    SPLITQ_RETURN_IF_ERROR(CheckBits(*bits, "bits (known map)"));
  } else {
    SPLITQ_RETURN_IF_ERROR(CheckBitCount(bits->size(), layout.groups, "bits"));
    SPLITQ_RETURN_IF_ERROR(CheckBits(*bits, "bits"));
  }

  // Scales and offsets.
  SPLITQ_RETURN_IF_ERROR(CheckScalesOffsets(frame.scales, frame.offsets, layout.groups));

  // Payload size (groups == scales.size() now, so the offsets are bounded by the frame).
  SPLITQ_ASSIGN_OR_RETURN(const std::vector<int64_t> offsets, SegmentOffsets(layout, *bits));
  SPLITQ_RETURN_IF_ERROR(CheckPayloadSize(frame, layout, offsets.back()));
  if (frame.coded && offsets.back() > limits.max_payload_bytes) {  // what decoding it allocates
    return absl::ResourceExhaustedError(absl::StrCat(
        "frame field 'payload': ", offsets.back(),
        " packed bytes once decoded exceed the receiver's limit of ", limits.max_payload_bytes));
  }

  // CRC.
  const uint32_t crc = ComputeFrameCrc(frame);
  if (crc != frame.crc32c) {
    return FieldError(
        "crc32c",
        absl::StrCat("CRC mismatch: frame says 0x", absl::Hex(frame.crc32c, absl::kZeroPad8),
                     ", contents give 0x", absl::Hex(crc, absl::kZeroPad8)));
  }
  return *bits;
}

absl::Status DecodePayload(const Frame& frame, absl::Span<const uint8_t> bits, void* out,
                           const kernels::ExecContext& cpu, const std::vector<uint8_t>* given) {
  if (cpu.device != kernels::Device::kCpu) {
    return absl::InvalidArgumentError("DecodePayload runs on the host: pass a CPU ExecContext");
  }
  if (!KnownDType(static_cast<uint8_t>(frame.dtype))) {
    return FieldError("dtype", absl::StrCat("unknown dtype ", static_cast<int>(frame.dtype)));
  }
  // Cheap re-checks of everything that bounds memory accesses.
  SPLITQ_ASSIGN_OR_RETURN(const kernels::GroupLayout layout, FrameLayout(frame));
  SPLITQ_RETURN_IF_ERROR(CheckBitCount(bits.size(), layout.groups, "bits"));
  SPLITQ_RETURN_IF_ERROR(CheckBits(bits, "bits"));
  SPLITQ_RETURN_IF_ERROR(CheckScalesOffsets(frame.scales, frame.offsets, layout.groups));
  SPLITQ_ASSIGN_OR_RETURN(const std::vector<int64_t> offsets, SegmentOffsets(layout, bits));
  SPLITQ_RETURN_IF_ERROR(CheckPayloadSize(frame, layout, offsets.back()));
  if (layout.numel() > 0 && out == nullptr) {
    return absl::InvalidArgumentError("DecodePayload: null output");
  }
  std::vector<uint8_t> decoded;
  if (frame.coded && given == nullptr) {
    SPLITQ_RETURN_IF_ERROR(EntropyDecode(frame.payload, layout, bits, &decoded, cpu));
  }
  const std::vector<uint8_t>& packed =
      !frame.coded ? frame.payload : (given != nullptr ? *given : decoded);
  if (static_cast<int64_t>(packed.size()) != offsets.back()) {
    return FieldError("payload", absl::StrCat(packed.size(),
                                              " packed bytes, but the shape and "
                                              "bit map imply ",
                                              offsets.back()));
  }
  kernels::QuantParams params;
  params.scale = frame.scales.data();
  params.offset = frame.offsets.data();
  params.zero_point = nullptr;
  params.bits = bits.data();
  params.is_signed = false;
  return kernels::UnpackDequantize(cpu, frame.dtype, layout, params, packed.data(),
                                   static_cast<int64_t>(packed.size()), offsets.data(), out);
}

absl::StatusOr<CodeEntropy> EntropyCodeFrame(Frame* frame, absl::Span<const uint8_t> bits,
                                             const kernels::ExecContext& cpu) {
  if (frame->coded)
    return absl::InvalidArgumentError("EntropyCodeFrame: the frame is coded already");
  SPLITQ_ASSIGN_OR_RETURN(const kernels::GroupLayout layout, FrameLayout(*frame));
  SPLITQ_RETURN_IF_ERROR(CheckBitCount(bits.size(), layout.groups, "bits"));
  SPLITQ_RETURN_IF_ERROR(CheckBits(bits, "bits"));
  CodeEntropy entropy;
  entropy.elements = layout.numel();
  if (layout.groups == 0 || layout.numel() == 0) return entropy;  // nothing to code
  SPLITQ_ASSIGN_OR_RETURN(CodedPayload coded, EntropyCode(frame->payload, layout, bits, cpu));
  entropy.bits = coded.entropy_bits;
  entropy.group_bits.resize(static_cast<size_t>(layout.groups));
  if (coded.bytes.size() < frame->payload.size()) {
    const double own = static_cast<double>(
        std::accumulate(coded.group_bytes.begin(), coded.group_bytes.end(), int64_t{0}));
    const double spread = own > 0 ? static_cast<double>(coded.bytes.size()) / own : 0.0;
    for (size_t g = 0; g < entropy.group_bits.size(); ++g) {
      entropy.group_bits[g] = static_cast<float>(8.0 * coded.group_bytes[g] * spread);
    }
    frame->payload = std::move(coded.bytes);
    frame->coded = true;
  } else {  // packed: k bits per code (the padding to whole bytes spread in proportion)
    const double payload_bits = 8.0 * static_cast<double>(frame->payload.size());
    const double total = std::accumulate(bits.begin(), bits.end(), 0.0);
    for (size_t g = 0; g < entropy.group_bits.size(); ++g) {
      entropy.group_bits[g] = static_cast<float>(payload_bits * bits[g] / total);
    }
  }
  return entropy;
}

absl::StatusOr<std::vector<uint8_t>> UncodedPayload(const Frame& frame,
                                                    absl::Span<const uint8_t> bits,
                                                    const kernels::ExecContext& cpu) {
  SPLITQ_ASSIGN_OR_RETURN(const kernels::GroupLayout layout, FrameLayout(frame));
  SPLITQ_RETURN_IF_ERROR(CheckBitCount(bits.size(), layout.groups, "bits"));
  SPLITQ_RETURN_IF_ERROR(CheckBits(bits, "bits"));
  SPLITQ_ASSIGN_OR_RETURN(const std::vector<int64_t> offsets, SegmentOffsets(layout, bits));
  SPLITQ_RETURN_IF_ERROR(CheckPayloadSize(frame, layout, offsets.back()));
  if (!frame.coded) return frame.payload;
  std::vector<uint8_t> packed;
  SPLITQ_RETURN_IF_ERROR(EntropyDecode(frame.payload, layout, bits, &packed, cpu));
  return packed;
}

absl::StatusOr<CodeEntropy> MeasureCodeEntropy(const Frame& frame, absl::Span<const uint8_t> bits,
                                               const std::vector<uint8_t>* packed) {
  SPLITQ_ASSIGN_OR_RETURN(const kernels::GroupLayout layout, FrameLayout(frame));
  SPLITQ_RETURN_IF_ERROR(CheckBitCount(bits.size(), layout.groups, "bits"));
  SPLITQ_RETURN_IF_ERROR(CheckBits(bits, "bits"));
  SPLITQ_ASSIGN_OR_RETURN(const std::vector<int64_t> offsets, SegmentOffsets(layout, bits));
  std::vector<uint8_t> decoded;
  if (frame.coded && packed == nullptr) {
    SPLITQ_ASSIGN_OR_RETURN(decoded, UncodedPayload(frame, bits));
    packed = &decoded;
  } else if (!frame.coded) {
    packed = &frame.payload;
  }
  if (static_cast<int64_t>(packed->size()) != offsets.back()) {
    return FieldError("payload", absl::StrCat(packed->size(),
                                              " bytes, but the shape and bit "
                                              "map imply ",
                                              offsets.back()));
  }
  const std::vector<uint8_t>& payload = *packed;
  CodeEntropy out;
  out.elements = layout.numel();
  const int64_t m = layout.per_group();
  if (m == 0) return out;
  std::array<int64_t, 256> counts;
  for (int64_t g = 0; g < layout.groups; ++g) {
    const int k = bits[static_cast<size_t>(g)];
    const uint32_t mask = (1u << k) - 1;
    counts.fill(0);
    const uint8_t* seg = payload.data() + offsets[static_cast<size_t>(g)];
    const int64_t seg_bytes = offsets[static_cast<size_t>(g) + 1] - offsets[static_cast<size_t>(g)];
    // Four interleaved histograms, so that runs of one code do not serialize the increments.
    std::array<std::array<int64_t, 256>, 4> part{};
    if (8 % k == 0) {
      // Whole codes per byte: the histogram of the full bytes, split into codes at the end;
      // the codes of a last, partial byte one by one (its padding bits are not codes, and a
      // peer's frame may not have them zero).
      const int64_t full = m * k / 8;
      std::array<int64_t, 256> byte_counts{};
      internal::AddByteHistogram(seg, full, &byte_counts);
      for (uint32_t v = 0; v < 256; ++v) {
        const int64_t n = byte_counts[v];
        if (n == 0) continue;
        for (int shift = 0; shift < 8; shift += k) counts[(v >> shift) & mask] += n;
      }
      for (int64_t i = full * 8 / k, shift = 0; i < m; ++i, shift += k) {
        ++counts[(seg[full] >> shift) & mask];
      }
    } else {
      // Every 8 codes fill exactly k bytes: read them as one little-endian word.
      int64_t i = 0;
      for (; i + 8 <= m; i += 8) {
        uint64_t word = 0;
        for (int j = 0; j < k; ++j) word |= uint64_t{seg[i / 8 * k + j]} << (8 * j);
        for (int j = 0; j < 8; ++j) ++part[j & 3][(word >> (j * k)) & mask];
      }
      // The last m % 8 codes: a 16-bit window at byte (i k) / 8 (k <= 8), the byte after the
      // segment read as 0.
      for (int64_t bit = i * k; i < m; ++i, bit += k) {
        const int64_t byte = bit >> 3;
        uint32_t window = seg[byte];
        if (byte + 1 < seg_bytes) window |= uint32_t{seg[byte + 1]} << 8;
        ++part[0][(window >> (bit & 7)) & mask];
      }
      for (uint32_t q = 0; q <= mask; ++q) {
        counts[q] = part[0][q] + part[1][q] + part[2][q] + part[3][q];
      }
    }
    double h = 0;
    const double n = static_cast<double>(m);
    for (uint32_t q = 0; q <= mask; ++q) {
      if (counts[q] == 0) continue;
      const double c = static_cast<double>(counts[q]);
      h -= c * std::log2(c / n);
    }
    out.bits += h;
  }
  return out;
}

absl::StatusOr<kernels::GroupLayout> ValidateEncodeArguments(absl::Span<const int64_t> shape,
                                                             int32_t group_axis,
                                                             absl::Span<const uint8_t> bits,
                                                             absl::Span<const float> scales,
                                                             absl::Span<const float> offsets) {
  SPLITQ_ASSIGN_OR_RETURN(const kernels::GroupLayout layout, LayoutFor(shape, group_axis));
  SPLITQ_RETURN_IF_ERROR(CheckBitCount(bits.size(), layout.groups, "bits"));
  SPLITQ_RETURN_IF_ERROR(CheckBits(bits, "bits"));
  SPLITQ_RETURN_IF_ERROR(CheckScalesOffsets(scales, offsets, layout.groups));
  return layout;
}

absl::StatusOr<Frame> EncodeFrame(const void* x, kernels::DType dtype,
                                  absl::Span<const int64_t> shape, int32_t group_axis,
                                  absl::Span<const uint8_t> bits, absl::Span<const float> scales,
                                  absl::Span<const float> offsets,
                                  const kernels::RoundingSpec& rounding,
                                  const kernels::ExecContext& cpu) {
  if (cpu.device != kernels::Device::kCpu) {
    return absl::InvalidArgumentError("EncodeFrame runs on the host: pass a CPU ExecContext");
  }
  if (!KnownDType(static_cast<uint8_t>(dtype))) {
    return FieldError("dtype", absl::StrCat("unknown dtype ", static_cast<int>(dtype)));
  }
  SPLITQ_ASSIGN_OR_RETURN(const kernels::GroupLayout layout,
                          ValidateEncodeArguments(shape, group_axis, bits, scales, offsets));
  if (layout.numel() > 0 && x == nullptr) {
    return absl::InvalidArgumentError("EncodeFrame: null input");
  }
  SPLITQ_ASSIGN_OR_RETURN(const std::vector<int64_t> segment, SegmentOffsets(layout, bits));
  const int64_t total = segment.back();
  if (static_cast<uint64_t>(total) > std::numeric_limits<size_t>::max()) {
    return FieldError("payload", "packed size does not fit in memory");
  }

  Frame f;
  f.dtype = dtype;
  f.shape.assign(shape.begin(), shape.end());
  f.group_axis = group_axis;
  f.bits.assign(bits.begin(), bits.end());
  f.scales.assign(scales.begin(), scales.end());
  f.offsets.assign(offsets.begin(), offsets.end());
  f.payload.resize(static_cast<size_t>(total));
  kernels::QuantParams params;
  params.scale = f.scales.data();
  params.offset = f.offsets.data();
  params.zero_point = nullptr;
  params.bits = f.bits.data();
  params.is_signed = false;
  SPLITQ_RETURN_IF_ERROR(kernels::QuantizePack(cpu, dtype, layout, params, rounding, x,
                                               segment.data(), f.payload.data(), total));
  return f;
}

}  // namespace splitq::quant
