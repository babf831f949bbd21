// splitq server: FrameChunk messages without copying their data, which is nearly all of a
// session's bytes.
//
// A chunk goes out as a gRPC ByteBuffer of two slices: a small head (the outer message's field
// tag and length, the FrameChunk's step, index, count and frame_bytes, and the data field's tag
// and length) and the data itself, which is a view of the frame. The slice holds a reference
// to the frame (a shared_ptr), so the frame lives until gRPC has written the bytes, even after
// the call that sent them has failed.
//
// A chunk comes in as views into the slices gRPC received (usually one per HTTP/2 DATA frame,
// 16 KiB by default), which the FrameAssembler copies into the frame: one copy per chunk in
// all, where protobuf's generated classes make four (set_data, serialize, parse, assemble).
//
// Both are valid protobuf encodings of TrainRequest, TrainReply and EvaluateRequest with their
// FrameChunk field (number 2 in each) set (EncodeChunk writes fields 1..5 even when they are 0
// or empty, which proto3's own serializer leaves out), so the other end may use the generated
// classes (tests do). Anything else, including a chunk message in an unusual but valid encoding (a
// repeated field, an unknown field, fields of another message), is left to protobuf: the
// decoder says "not mine" and the caller parses the bytes with the generated class.
#pragma once

#include <grpcpp/impl/codegen/proto_utils.h>  // SerializationTraits of protobuf messages
#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/slice.h>
#include <grpcpp/support/sync_stream.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "proto/frame_assembler.h"

namespace splitq::rpc {

// The field number of the FrameChunk in TrainRequest (activation), TrainReply (gradient) and
// EvaluateRequest (activation).
inline constexpr int kChunkField = 2;
// The second frame of a U-shaped step: TrainRequest.head_gradient, TrainReply.output.
inline constexpr int kSecondChunkField = 4;

// Bytes [begin, begin + length) of `frame` as a message whose field `field` (kChunkField or
// kSecondChunkField) is the FrameChunk {step, index, count, frame_bytes, data}. The data is not
// copied: the buffer keeps `frame` alive. begin + length must not exceed frame->size().
grpc::ByteBuffer EncodeChunk(uint64_t step, uint32_t index, uint32_t count, uint64_t frame_bytes,
                             std::shared_ptr<const std::string> frame, size_t begin, size_t length,
                             int field = kChunkField);

// A protobuf message as a ByteBuffer, and back (false: the bytes do not parse as M).
template <typename M>
grpc::ByteBuffer ToByteBuffer(const M& message) {
  grpc::ByteBuffer buffer;
  bool own = false;
  (void)grpc::SerializationTraits<M>::Serialize(message, &buffer, &own);
  return buffer;
}
template <typename M>
bool FromByteBuffer(grpc::ByteBuffer* buffer, M* message) {
  return grpc::SerializationTraits<M>::Deserialize(buffer, message).ok();
}

// The Worker methods' full names (worker.proto; the generated code keeps its own copies
// private; chunk_codec_test checks these against the proto's descriptor).
inline constexpr char kWorkerTrainMethod[] = "/splitq.v1.Worker/Train";
inline constexpr char kWorkerEvaluateMethod[] = "/splitq.v1.Worker/Evaluate";

// A sync bidirectional stream of raw messages on `method` (one of the above).
using RawStream = grpc::ClientReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>;
std::unique_ptr<RawStream> OpenRawStream(grpc::ChannelInterface* channel, const char* method,
                                         grpc::ClientContext* context);

// A received chunk: `chunk` with its data as `pieces`, views into `slices`. Moving it keeps
// the views valid (the slices' memory does not move); copying it is not allowed.
struct ChunkMessage {
  Chunk chunk;
  int field = kChunkField;  // or kSecondChunkField
  std::vector<grpc::Slice> slices;
  std::vector<absl::string_view> pieces;

  ChunkMessage() = default;
  ChunkMessage(ChunkMessage&&) = default;
  ChunkMessage& operator=(ChunkMessage&&) = default;
  ChunkMessage(const ChunkMessage&) = delete;
  ChunkMessage& operator=(const ChunkMessage&) = delete;
};

// The chunk in `buffer` when it holds only field kChunkField or kSecondChunkField (which one:
// ChunkMessage::field), once, in the encoding protobuf
// (or EncodeChunk) writes: varint fields 1..4 at most once each, bytes field 5 at most once,
// nothing else; tags of one byte and lengths in the shortest varint of at most 5 bytes, as
// protobuf writes them. Otherwise nullopt (the caller parses `buffer` with protobuf, which
// decides what it is and whether it is valid). Never fails and never reads past the buffer.
std::optional<ChunkMessage> DecodeChunk(const grpc::ByteBuffer& buffer);

}  // namespace splitq::rpc
