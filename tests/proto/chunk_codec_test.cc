// proto/chunk_codec.h: chunks encoded without copies parse with the generated protobuf
// classes, chunks the generated classes wrote decode (in one slice or in many), anything else
// is left to protobuf, and on random and mutated bytes the decoder agrees with protobuf
// whenever it accepts. The encoded data keeps its frame alive.
#include "proto/chunk_codec.h"

#include <gtest/gtest.h>

#include <memory>
#include <random>
#include <string>
#include <vector>

#include "splitq/v1/worker.grpc.pb.h"

namespace splitq::rpc {
namespace {

using splitq::v1::EvaluateRequest;
using splitq::v1::TrainReply;
using splitq::v1::TrainRequest;

// `bytes` as a ByteBuffer of pieces cut at random places (empty pieces included).
grpc::ByteBuffer Sliced(const std::string& bytes, std::mt19937& rng) {
  std::vector<grpc::Slice> slices;
  size_t at = 0;
  while (at < bytes.size()) {
    const size_t n = std::min(bytes.size() - at, static_cast<size_t>(rng() % 9));
    slices.emplace_back(bytes.data() + at, n);
    at += n;
  }
  if (slices.empty()) slices.emplace_back("", 0);
  return grpc::ByteBuffer(slices.data(), slices.size());
}

std::string Data(const ChunkMessage& m) {
  std::string out;
  for (absl::string_view p : m.chunk.pieces) out.append(p.data(), p.size());
  return out;
}

TEST(ChunkCodec, MethodNamesAreTheProtosOwn) {
  const google::protobuf::ServiceDescriptor* worker =
      TrainRequest::descriptor()->file()->FindServiceByName("Worker");
  ASSERT_NE(worker, nullptr);
  ASSERT_EQ(worker->full_name(), splitq::v1::Worker::service_full_name());
  EXPECT_EQ(kWorkerTrainMethod, "/" + worker->full_name() + "/" + worker->method(0)->name());
  EXPECT_EQ(worker->method(0)->name(), "Train");
  EXPECT_EQ(kWorkerEvaluateMethod, "/" + worker->full_name() + "/" + worker->method(1)->name());
  EXPECT_EQ(worker->method(1)->name(), "Evaluate");
}

TEST(ChunkCodec, EncodedChunksParseWithTheGeneratedClasses) {
  auto frame = std::make_shared<const std::string>("0123456789abcdefghij");
  grpc::ByteBuffer buffer = EncodeChunk(uint64_t{1} << 40, 3, 7, 20, frame, 5, 9);
  TrainRequest request;
  ASSERT_TRUE(FromByteBuffer(&buffer, &request));
  ASSERT_TRUE(request.has_activation());
  EXPECT_EQ(request.activation().step(), uint64_t{1} << 40);
  EXPECT_EQ(request.activation().index(), 3u);
  EXPECT_EQ(request.activation().count(), 7u);
  EXPECT_EQ(request.activation().frame_bytes(), 20u);
  EXPECT_EQ(request.activation().data(), "56789abcd");
  // The same bytes are a TrainReply's gradient and an EvaluateRequest's activation.
  buffer = EncodeChunk(0, 0, 1, 20, frame, 0, 20);
  TrainReply reply;
  ASSERT_TRUE(FromByteBuffer(&buffer, &reply));
  EXPECT_EQ(reply.gradient().data(), *frame);
  buffer = EncodeChunk(2, 0, 1, 0, frame, 0, 0);  // an empty chunk
  EvaluateRequest evaluate;
  ASSERT_TRUE(FromByteBuffer(&buffer, &evaluate));
  EXPECT_TRUE(evaluate.has_activation());
  EXPECT_EQ(evaluate.activation().step(), 2u);
  EXPECT_TRUE(evaluate.activation().data().empty());
}

TEST(ChunkCodec, TheEncodedDataIsTheFrameItselfAndKeepsItAlive) {
  auto frame = std::make_shared<const std::string>(std::string(1 << 20, 'x'));
  const std::weak_ptr<const std::string> watch = frame;
  const char* data = frame->data();
  {
    grpc::ByteBuffer buffer = EncodeChunk(0, 0, 1, frame->size(), frame, 4096, 8192);
    frame.reset();
    EXPECT_FALSE(watch.expired());  // the buffer holds it
    std::vector<grpc::Slice> slices;
    ASSERT_TRUE(buffer.Dump(&slices).ok());
    ASSERT_EQ(slices.size(), 2u);
    EXPECT_EQ(reinterpret_cast<const char*>(slices[1].begin()), data + 4096);  // not a copy
    EXPECT_EQ(slices[1].size(), 8192u);
  }
  EXPECT_TRUE(watch.expired());
}

TEST(ChunkCodec, DecodesWhatTheGeneratedClassesWriteInOneSliceOrMany) {
  std::mt19937 rng(7);
  for (const uint64_t step : {uint64_t{0}, uint64_t{5}, ~uint64_t{0}}) {
    TrainRequest request;
    auto* c = request.mutable_activation();
    c->set_step(step);
    c->set_index(step == 0 ? 0 : 2);
    c->set_count(step == 0 ? 1 : 4);
    c->set_frame_bytes(step == 0 ? 0 : 1000);
    c->set_data(step == 0 ? "" : std::string(300, 'q'));
    const std::string bytes = request.SerializeAsString();
    for (int cut = 0; cut < 2; ++cut) {
      const grpc::ByteBuffer buffer = cut == 0 ? ToByteBuffer(request) : Sliced(bytes, rng);
      std::optional<ChunkMessage> m = DecodeChunk(buffer);
      ASSERT_TRUE(m.has_value()) << "step " << step << " cut " << cut;
      EXPECT_EQ(m->chunk.step, step);
      EXPECT_EQ(m->chunk.index, c->index());
      EXPECT_EQ(m->chunk.count, c->count());
      EXPECT_EQ(m->chunk.frame_bytes, c->frame_bytes());
      EXPECT_EQ(Data(*m), c->data());
      EXPECT_EQ(m->chunk.size(), static_cast<int64_t>(c->data().size()));
      ChunkMessage moved = std::move(*m);  // the views stay valid
      EXPECT_EQ(Data(moved), c->data());
    }
  }
}

TEST(ChunkCodec, LeavesEveryOtherMessageToProtobuf) {
  TrainRequest hello;
  hello.mutable_hello()->set_client_id("c");
  EXPECT_FALSE(DecodeChunk(ToByteBuffer(hello)));
  TrainRequest labels;
  labels.mutable_labels()->add_values(3);
  EXPECT_FALSE(DecodeChunk(ToByteBuffer(labels)));
  EXPECT_FALSE(DecodeChunk(ToByteBuffer(TrainRequest())));  // empty
  TrainRequest chunk;
  chunk.mutable_activation()->set_step(4);
  chunk.mutable_activation()->set_data("abc");
  const std::string good = chunk.SerializeAsString();
  auto decode = [](const std::string& bytes) {
    grpc::Slice slice(bytes);
    return DecodeChunk(grpc::ByteBuffer(&slice, 1)).has_value();
  };
  ASSERT_TRUE(decode(good));
  EXPECT_FALSE(decode(good + good));                       // the field twice (protobuf merges them)
  EXPECT_FALSE(decode(good + hello.SerializeAsString()));  // then a hello (the last one wins)
  EXPECT_FALSE(decode(good.substr(0, good.size() - 1)));   // truncated
  // An unknown field inside the chunk (field 9, varint 1): valid protobuf, not our encoding.
  std::string unknown = good;
  unknown[1] = static_cast<char>(unknown[1] + 2);
  unknown += std::string("\x48\x01", 2);
  EXPECT_FALSE(decode(unknown));
  TrainRequest check;
  EXPECT_TRUE(check.ParseFromString(unknown));
  // Tags and lengths in longer varints than protobuf writes: declined. An outer length of 6
  // bytes, which protobuf itself refuses (a length has at most 5), must not train.
  const std::string padded_outer(
      "\x12\x87\x80\x80\x80\x80\x00\x08\x04\x2a\x03"
      "abc",
      14);
  EXPECT_FALSE(decode(padded_outer));
  EXPECT_FALSE(check.ParseFromString(padded_outer));
  const std::string padded_data(
      "\x12\x08\x08\x04\x2a\x83\x00"
      "abc",
      10);  // valid protobuf
  EXPECT_FALSE(decode(padded_data));
  EXPECT_TRUE(check.ParseFromString(padded_data));
  EXPECT_EQ(check.activation().data(), "abc");
  const std::string long_tag(
      "\x92\x00\x07\x08\x04\x2a\x03"
      "abc",
      10);
  EXPECT_FALSE(decode(long_tag));
  // index above 32 bits: protobuf truncates, the decoder declines.
  std::string wide =
      "\x12\x0b\x10\xff\xff\xff\xff\x1f\x2a\x03"
      "abc";
  wide[1] = static_cast<char>(wide.size() - 2);
  EXPECT_FALSE(decode(wide));
}

// Whenever the decoder takes a message, protobuf parses the same bytes to the same chunk.
TEST(ChunkCodec, AgreesWithProtobufOnMutatedBytes) {
  std::mt19937 rng(11);
  TrainRequest request;
  auto* c = request.mutable_activation();
  c->set_step(300);
  c->set_index(1);
  c->set_count(2);
  c->set_frame_bytes(70);
  c->set_data(std::string(40, 'z'));
  const std::string good = request.SerializeAsString();
  int accepted = 0;
  for (int trial = 0; trial < 20000; ++trial) {
    std::string bytes = good;
    const int edits = 1 + static_cast<int>(rng() % 3);
    for (int e = 0; e < edits; ++e) {
      switch (rng() % 4) {
        case 0:
          bytes[rng() % bytes.size()] = static_cast<char>(rng());
          break;
        case 1:
          bytes.resize(rng() % (bytes.size() + 1));
          break;
        case 2:
          bytes.insert(rng() % (bytes.size() + 1), 1, static_cast<char>(rng()));
          break;
        default:
          bytes[rng() % bytes.size()] ^= static_cast<char>(1 << (rng() % 8));
          break;
      }
      if (bytes.empty()) bytes = "\x12";
    }
    std::optional<ChunkMessage> m = DecodeChunk(Sliced(bytes, rng));
    if (!m) continue;
    ++accepted;
    TrainRequest parsed;
    ASSERT_TRUE(parsed.ParseFromString(bytes)) << "trial " << trial;
    // A mutated tag may make it the U-shaped head gradient (field 4): the same FrameChunk.
    ASSERT_TRUE(m->field == kChunkField ? parsed.has_activation() : parsed.has_head_gradient())
        << "trial " << trial << ", field " << m->field;
    const auto& p = m->field == kChunkField ? parsed.activation() : parsed.head_gradient();
    EXPECT_EQ(m->chunk.step, p.step());
    EXPECT_EQ(m->chunk.index, p.index());
    EXPECT_EQ(m->chunk.count, p.count());
    EXPECT_EQ(m->chunk.frame_bytes, p.frame_bytes());
    EXPECT_EQ(Data(*m), p.data());
  }
  EXPECT_GT(accepted, 100);  // the mutations leave many valid chunks: the check did run
}

// The second frame of a U-shaped step (field 4 in TrainRequest and TrainReply) goes through the
// same codec, and protobuf reads it as head_gradient / output.
TEST(ChunkCodec, SecondFieldIsTheHeadGradientAndTheOutput) {
  auto frame = std::make_shared<const std::string>("0123456789abcdef");
  const grpc::ByteBuffer buffer = EncodeChunk(7, 0, 1, 16, frame, 0, 16, kSecondChunkField);
  std::optional<ChunkMessage> m = DecodeChunk(buffer);
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->field, kSecondChunkField);
  EXPECT_EQ(m->chunk.step, 7u);
  grpc::ByteBuffer copy = buffer;
  TrainRequest request;
  ASSERT_TRUE(FromByteBuffer(&copy, &request));
  EXPECT_EQ(request.head_gradient().data(), *frame);
  copy = buffer;
  splitq::v1::TrainReply reply;
  ASSERT_TRUE(FromByteBuffer(&copy, &reply));
  EXPECT_EQ(reply.output().data(), *frame);
  // Field 2 stays the first frame.
  m = DecodeChunk(EncodeChunk(7, 0, 1, 16, frame, 0, 16));
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->field, kChunkField);
}

}  // namespace
}  // namespace splitq::rpc
