#include "proto/chunk_codec.h"

#include <grpcpp/impl/codegen/rpc_method.h>

#include <array>
#include <cassert>
#include <utility>

namespace splitq::rpc {
namespace {

constexpr uint32_t kVarint = 0, kLengthDelimited = 2;

void PutVarint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>(v | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

void PutTag(std::string& out, uint32_t field, uint32_t wire_type) {
  PutVarint(out, (field << 3) | wire_type);
}

// Reads the bytes of a sequence of slices front to back.
class SliceReader {
 public:
  explicit SliceReader(const std::vector<grpc::Slice>& slices) : slices_(slices) {
    for (const grpc::Slice& s : slices_) remaining_ += s.size();
    Settle();
  }

  uint64_t remaining() const { return remaining_; }
  void set_remaining(uint64_t n) { remaining_ = n; }  // a limit: at most the bytes left

  bool ReadByte(uint8_t* b) {
    if (remaining_ == 0 || slice_ == slices_.size()) return false;
    *b = slices_[slice_].begin()[offset_];
    Advance(1);
    return true;
  }

  bool ReadVarint(uint64_t* v) {
    *v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      uint8_t b;
      if (!ReadByte(&b)) return false;
      if (shift == 63 && b > 1) return false;  // more than 64 bits
      *v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if ((b & 0x80) == 0) return true;
    }
    return false;
  }

  // A tag of the fields we take (numbers 1..15): one byte. Longer tags are left to protobuf.
  bool ReadTag(uint64_t* tag) {
    uint8_t b;
    if (!ReadByte(&b) || (b & 0x80) != 0) return false;
    *tag = b;
    return true;
  }

  // A length as protobuf writes it: the shortest varint (at most 5 bytes), at most 1 GiB.
  // (Protobuf refuses lengths longer than 5 bytes; a longer or padded one is left to it.)
  bool ReadLength(uint64_t* n) {
    *n = 0;
    for (int shift = 0; shift < 35; shift += 7) {
      uint8_t b;
      if (!ReadByte(&b)) return false;
      if (shift > 0 && b == 0) return false;  // padded: not the shortest form
      *n |= static_cast<uint64_t>(b & 0x7f) << shift;
      if ((b & 0x80) == 0) return *n <= (uint64_t{1} << 30);
    }
    return false;
  }

  // The next n bytes as views, appended to *pieces.
  bool Take(uint64_t n, std::vector<absl::string_view>* pieces) {
    if (n > remaining_) return false;
    while (n > 0) {
      if (slice_ == slices_.size()) return false;
      const grpc::Slice& s = slices_[slice_];
      const size_t take = static_cast<size_t>(std::min<uint64_t>(n, s.size() - offset_));
      pieces->emplace_back(reinterpret_cast<const char*>(s.begin()) + offset_, take);
      Advance(take);
      n -= take;
    }
    return true;
  }

 private:
  void Advance(size_t n) {
    offset_ += n;
    remaining_ -= n;
    Settle();
  }
  // Moves past finished (and empty) slices.
  void Settle() {
    while (slice_ < slices_.size() && offset_ == slices_[slice_].size()) {
      ++slice_;
      offset_ = 0;
    }
  }

  const std::vector<grpc::Slice>& slices_;
  size_t slice_ = 0, offset_ = 0;
  uint64_t remaining_ = 0;
};

void Unref(void* frame) { delete static_cast<std::shared_ptr<const std::string>*>(frame); }

}  // namespace

grpc::ByteBuffer EncodeChunk(uint64_t step, uint32_t index, uint32_t count, uint64_t frame_bytes,
                             std::shared_ptr<const std::string> frame, size_t begin, size_t length,
                             int field) {
  assert(begin <= frame->size() && length <= frame->size() - begin);
  std::string inner;  // FrameChunk's fields 1..4 and the tag and length of field 5
  PutTag(inner, 1, kVarint);
  PutVarint(inner, step);
  PutTag(inner, 2, kVarint);
  PutVarint(inner, index);
  PutTag(inner, 3, kVarint);
  PutVarint(inner, count);
  PutTag(inner, 4, kVarint);
  PutVarint(inner, frame_bytes);
  PutTag(inner, 5, kLengthDelimited);
  PutVarint(inner, length);
  std::string head;
  head.reserve(inner.size() + 12);
  PutTag(head, static_cast<uint32_t>(field), kLengthDelimited);
  PutVarint(head, inner.size() + length);
  head += inner;
  if (length == 0) {
    grpc::Slice only(head);
    return grpc::ByteBuffer(&only, 1);
  }
  char* data = const_cast<char*>(frame->data()) + begin;  // gRPC only reads it
  std::array<grpc::Slice, 2> slices = {
      grpc::Slice(head),
      grpc::Slice(data, length, &Unref, new std::shared_ptr<const std::string>(std::move(frame)))};
  return grpc::ByteBuffer(slices.data(), slices.size());
}

std::unique_ptr<RawStream> OpenRawStream(grpc::ChannelInterface* channel, const char* method,
                                         grpc::ClientContext* context) {
  const grpc::internal::RpcMethod rpc(method, grpc::internal::RpcMethod::BIDI_STREAMING);
  return std::unique_ptr<RawStream>(
      grpc::internal::ClientReaderWriterFactory<grpc::ByteBuffer, grpc::ByteBuffer>::Create(
          channel, rpc, context));
}

std::optional<ChunkMessage> DecodeChunk(const grpc::ByteBuffer& buffer) {
  ChunkMessage m;
  if (!buffer.Dump(&m.slices).ok()) return std::nullopt;
  SliceReader in(m.slices);
  uint64_t tag, length;
  if (!in.ReadTag(&tag) || (tag & 7) != kLengthDelimited ||
      ((tag >> 3) != kChunkField && (tag >> 3) != kSecondChunkField) || !in.ReadLength(&length) ||
      length > in.remaining()) {
    return std::nullopt;
  }
  m.field = static_cast<int>(tag >> 3);
  in.set_remaining(length);
  std::array<bool, 6> seen{};
  while (in.remaining() > 0) {
    uint64_t field_tag, v;
    if (!in.ReadTag(&field_tag)) return std::nullopt;
    const uint64_t field = field_tag >> 3, wire_type = field_tag & 7;
    if (field < 1 || field > 5 || seen[field]) return std::nullopt;
    seen[field] = true;
    if (field == 5) {
      if (wire_type != kLengthDelimited || !in.ReadLength(&v) || !in.Take(v, &m.pieces)) {
        return std::nullopt;
      }
      continue;
    }
    if (wire_type != kVarint || !in.ReadVarint(&v)) return std::nullopt;
    if ((field == 2 || field == 3) && v > UINT32_MAX) return std::nullopt;
    switch (field) {
      case 1:
        m.chunk.step = v;
        break;
      case 2:
        m.chunk.index = static_cast<uint32_t>(v);
        break;
      case 3:
        m.chunk.count = static_cast<uint32_t>(v);
        break;
      default:
        m.chunk.frame_bytes = v;
        break;
    }
  }
  // The message ends with the chunk.
  uint8_t extra;
  in.set_remaining(1);
  if (in.ReadByte(&extra)) return std::nullopt;
  m.chunk.pieces = m.pieces;
  return m;
}

}  // namespace splitq::rpc
