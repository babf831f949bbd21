#include "proto/frame_assembler.h"

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"

namespace splitq::rpc {

int MaxMessageBytes(const AssemblerLimits& limits) {
  return static_cast<int>(std::min<int64_t>(limits.max_chunk_bytes + (64 << 10), INT32_MAX));
}

int64_t Chunk::size() const {
  if (pieces.empty()) return static_cast<int64_t>(data.size());
  int64_t n = 0;
  for (const absl::string_view p : pieces) n += static_cast<int64_t>(p.size());
  return n;
}

void FrameAssembler::Reset() {
  buffer_.clear();
  buffer_.shrink_to_fit();
  step_ = 0;
  count_ = next_index_ = 0;
  frame_bytes_ = 0;
}

absl::StatusOr<std::optional<std::string>> FrameAssembler::Add(const Chunk& c,
                                                               uint64_t expected_step) {
  absl::Status error;
  const std::string where = absl::StrCat("chunk ", c.index, "/", c.count, " of step ", c.step);
  const int64_t size = c.size();
  if (size > limits_.max_chunk_bytes) {
    error = absl::ResourceExhaustedError(
        absl::StrCat(where, ": ", size, " bytes, above the chunk limit ", limits_.max_chunk_bytes));
  } else if (c.frame_bytes > static_cast<uint64_t>(limits_.max_frame_bytes)) {
    error = absl::ResourceExhaustedError(absl::StrCat(where, ": a frame of ", c.frame_bytes,
                                                      " bytes, above the frame limit ",
                                                      limits_.max_frame_bytes));
  } else if (c.count == 0 || c.index >= c.count) {
    error = absl::InvalidArgumentError(absl::StrCat(where, ": index or count out of range"));
  } else if (next_index_ == 0 && c.index != 0) {
    error = absl::FailedPreconditionError(absl::StrCat(where, ": a frame must start with chunk 0"));
  } else if (next_index_ == 0 && c.step != expected_step) {
    error = absl::FailedPreconditionError(absl::StrCat(
        where, ": step ", c.step, " is ", c.step < expected_step ? "a replay" : "ahead", "; step ",
        expected_step, " is due"));
  } else if (next_index_ > 0 && (c.index != next_index_ || c.step != step_ || c.count != count_ ||
                                 c.frame_bytes != frame_bytes_)) {
    error =
        absl::FailedPreconditionError(absl::StrCat(where, ": out of sequence (chunk ", next_index_,
                                                   "/", count_, " of step ", step_, " is due)"));
  } else if (buffer_.size() + static_cast<uint64_t>(size) > c.frame_bytes) {
    error = absl::InvalidArgumentError(
        absl::StrCat(where, ": more bytes than the frame_bytes ", c.frame_bytes, " it declared"));
  }
  if (!error.ok()) {
    Reset();
    return error;
  }
  if (next_index_ == 0) {
    step_ = c.step;
    count_ = c.count;
    frame_bytes_ = c.frame_bytes;
  }
  // Memory follows the bytes that arrive, never above frame_bytes: the whole frame once 1/16 of
  // it is here (at once for a frame of up to 16 chunks), before that 4 times more at each step.
  // So a chunk never makes the buffer more than 16 x the bytes received (a tiny first chunk
  // announcing 256 MiB takes 16 x its own size), and a long frame is copied over at most once,
  // when 1/16 of it is in.
  const size_t needed = buffer_.size() + static_cast<size_t>(size);
  if (needed > buffer_.capacity()) {
    const size_t cap =
        needed * 16 >= frame_bytes_ ? frame_bytes_ : std::max(needed, 4 * buffer_.capacity());
    std::string bigger;
    bigger.reserve(std::min<size_t>(cap, frame_bytes_));  // a fresh string: exactly that much
    bigger.append(buffer_);
    buffer_.swap(bigger);
  }
  if (c.pieces.empty()) {
    buffer_.append(c.data.data(), c.data.size());
  } else {
    for (const absl::string_view p : c.pieces) buffer_.append(p.data(), p.size());
  }
  ++next_index_;
  if (next_index_ < count_) return std::optional<std::string>();
  if (buffer_.size() != frame_bytes_) {
    const std::string message = absl::StrCat(where, ": the frame has ", buffer_.size(),
                                             " bytes, its chunks declared ", frame_bytes_);
    Reset();
    return absl::InvalidArgumentError(message);
  }
  std::string frame = std::move(buffer_);
  Reset();
  return std::optional<std::string>(std::move(frame));
}

}  // namespace splitq::rpc
