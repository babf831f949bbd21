// splitq server: reassembles one serialized frame from the chunks of a stream
// (proto/splitq/v1/worker.proto, FrameChunk), with every limit checked before memory is
// taken, so a bad or hostile peer cannot make a worker allocate more than `max_frame_bytes`
// per session.
//
// Rules (each a status naming the chunk):
//   - a chunk's data is at most max_chunk_bytes                       RESOURCE_EXHAUSTED
//   - frame_bytes is at most max_frame_bytes                          RESOURCE_EXHAUSTED
//   - count >= 1 and index < count; the bytes received never exceed frame_bytes, and the
//     last chunk brings the total to exactly frame_bytes              INVALID_ARGUMENT
//   - chunks of a frame arrive in order 0, 1, ..., count-1, with the same step, count and
//     frame_bytes; the first chunk of a frame has the step the caller expects
//                                                                     FAILED_PRECONDITION
// After an error the assembler is empty again (the partial frame is dropped).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace splitq::rpc {

struct AssemblerLimits {
  int64_t max_chunk_bytes = 4 << 20;    // FrameChunk.data, bytes
  int64_t max_frame_bytes = 256 << 20;  // a whole serialized frame, bytes
};

struct Chunk {
  uint64_t step = 0;
  uint32_t index = 0;
  uint32_t count = 0;
  uint64_t frame_bytes = 0;
  absl::string_view data;  // the chunk's bytes, when they are in one piece
  // Or, when not empty, the chunk's bytes in order in several pieces (`data` is then ignored):
  // a chunk received by gRPC lies in the pieces of its HTTP/2 frames (chunk_codec.h).
  absl::Span<const absl::string_view> pieces;

  int64_t size() const;  // bytes of data
};

// The gRPC message size both ends of a frame stream must allow: the largest chunk plus
// framing. A step's labels travel in one message too, so they are bounded by it as well (about
// 340,000 labels with their sample ids at the default 4 MiB chunk limit).
int MaxMessageBytes(const AssemblerLimits& limits);

class FrameAssembler {
 public:
  explicit FrameAssembler(const AssemblerLimits& limits = {}) : limits_(limits) {}

  // Adds a chunk of the frame for `expected_step`. Returns the whole frame's bytes when this
  // chunk completed it, nullopt while more chunks are due, or an error.
  absl::StatusOr<std::optional<std::string>> Add(const Chunk& chunk, uint64_t expected_step);

  bool in_progress() const { return next_index_ > 0; }
  int64_t buffered_bytes() const { return static_cast<int64_t>(buffer_.size()); }
  // Memory the partial frame holds: at least buffered_bytes, at most 16 x buffered_bytes and
  // at most the frame's frame_bytes (or 30 bytes), however large frame_bytes claims to be.
  // While it grows the old buffer is held too, for the copy.
  int64_t reserved_bytes() const { return static_cast<int64_t>(buffer_.capacity()); }

 private:
  void Reset();

  AssemblerLimits limits_;
  std::string buffer_;
  uint64_t step_ = 0;
  uint32_t count_ = 0, next_index_ = 0;
  uint64_t frame_bytes_ = 0;
};

}  // namespace splitq::rpc
