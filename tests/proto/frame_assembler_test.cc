// proto/frame_assembler.h: frames come back whole from in-order chunks; every broken rule
// (oversized chunk or frame, replayed or skipped step, out-of-order chunk, a byte count
// that lies) is refused with its status code, and the assembler is empty and usable after.
#include "proto/frame_assembler.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace splitq::rpc {
namespace {

Chunk Make(uint64_t step, uint32_t index, uint32_t count, uint64_t frame_bytes,
           absl::string_view data) {
  return Chunk{step, index, count, frame_bytes, data, {}};
}

TEST(FrameAssembler, ReassemblesInOrderChunks) {
  FrameAssembler a;
  const std::string frame = "abcdefghij";
  auto r = a.Add(Make(3, 0, 3, 10, "abcd"), 3);
  ASSERT_TRUE(r.ok() && !r->has_value());
  r = a.Add(Make(3, 1, 3, 10, "efgh"), 3);
  ASSERT_TRUE(r.ok() && !r->has_value());
  EXPECT_TRUE(a.in_progress());
  r = a.Add(Make(3, 2, 3, 10, "ij"), 3);
  ASSERT_TRUE(r.ok() && r->has_value());
  EXPECT_EQ(**r, frame);
  EXPECT_FALSE(a.in_progress());
  // A one-chunk frame.
  r = a.Add(Make(4, 0, 1, 2, "xy"), 4);
  ASSERT_TRUE(r.ok() && r->has_value());
  EXPECT_EQ(**r, "xy");
}

TEST(FrameAssembler, TakesAChunkInPieces) {
  FrameAssembler a({8, 100});
  const std::vector<absl::string_view> pieces = {"ab", "", "cde"};
  Chunk c = Make(0, 0, 2, 9, "ignored when there are pieces");
  c.pieces = pieces;
  EXPECT_EQ(c.size(), 5);
  auto r = a.Add(c, 0);
  ASSERT_TRUE(r.ok() && !r->has_value()) << r.status();
  const std::vector<absl::string_view> rest = {"fg", "hi"};
  c = Make(0, 1, 2, 9, "");
  c.pieces = rest;
  r = a.Add(c, 0);
  ASSERT_TRUE(r.ok() && r->has_value()) << r.status();
  EXPECT_EQ(**r, "abcdefghi");
  // The limits count the pieces' bytes: 9 bytes in pieces are above a chunk limit of 8.
  const std::vector<absl::string_view> big = {"abcd", "efghi"};
  c = Make(1, 0, 1, 9, "");
  c.pieces = big;
  EXPECT_EQ(a.Add(c, 1).status().code(), absl::StatusCode::kResourceExhausted);
}

// Memory follows the bytes that arrive, not what frame_bytes announces: a 10-byte chunk of a
// frame said to be 200 MiB reserves little; frames still assemble, and a frame of up to 16
// chunks gets its whole size at once.
TEST(FrameAssembler, ReservesForWhatArrivesNotWhatIsAnnounced) {
  FrameAssembler a({1 << 20, 256 << 20});
  const std::string ten(10, 'x');
  auto r = a.Add(Make(0, 0, 2, 200 << 20, ten), 0);
  ASSERT_TRUE(r.ok() && !r->has_value()) << r.status();
  EXPECT_LE(a.reserved_bytes(), 1024);
  FrameAssembler b({1 << 20, 256 << 20});
  std::string whole;
  for (uint32_t i = 0; i < 5; ++i) {
    const std::string piece(1000, static_cast<char>('a' + i));
    whole += piece;
    r = b.Add(Make(0, i, 5, 5000, piece), 0);
    ASSERT_TRUE(r.ok()) << r.status();
    if (i < 4) {
      EXPECT_LE(b.reserved_bytes(), 5000) << i;  // never above the frame
    }
  }
  ASSERT_TRUE(r->has_value());
  EXPECT_EQ(**r, whole);
  // A large frame in many chunks (48 MiB in 3 MiB chunks): never above its size either.
  FrameAssembler large({4 << 20, 256 << 20});
  const std::string chunk(3 << 20, 'q');
  for (uint32_t i = 0; i < 16; ++i) {
    r = large.Add(Make(0, i, 16, 48 << 20, chunk), 0);
    ASSERT_TRUE(r.ok()) << r.status();
    if (i < 15) {
      EXPECT_LE(large.reserved_bytes(), 48 << 20) << i;
      EXPECT_GE(large.reserved_bytes(), large.buffered_bytes()) << i;
    }
  }
  ASSERT_TRUE(r->has_value());
  EXPECT_EQ((*r)->size(), size_t{48} << 20);
  EXPECT_LE((*r)->capacity(), size_t{48} << 20);
  // A frame of many small chunks (4 MiB in 256 chunks of 16 KiB): the buffer stays within 16 x
  // what arrived and within the frame, and grows a few times only (each growth is a copy).
  FrameAssembler many({1 << 20, 256 << 20});
  const std::string small(16 << 10, 's');
  int growths = 0;
  int64_t last_capacity = 0;
  for (uint32_t i = 0; i < 256; ++i) {
    r = many.Add(Make(0, i, 256, 4 << 20, small), 0);
    ASSERT_TRUE(r.ok()) << r.status();
    if (i == 255) break;
    EXPECT_LE(many.reserved_bytes(), 16 * many.buffered_bytes()) << i;
    EXPECT_LE(many.reserved_bytes(), 4 << 20) << i;
    growths += many.reserved_bytes() != last_capacity;
    last_capacity = many.reserved_bytes();
  }
  ASSERT_TRUE(r->has_value());
  EXPECT_EQ((*r)->size(), size_t{4} << 20);
  EXPECT_LE(growths, 4);  // 16 KiB, 64 KiB, 256 KiB, then the whole 4 MiB
  FrameAssembler c;
  r = c.Add(Make(0, 0, 2, 3000, std::string(1000, 'z')), 0);
  ASSERT_TRUE(r.ok());
  EXPECT_GE(c.reserved_bytes(), 3000);  // 4 x 1000 covers the 3000 announced
}

TEST(FrameAssembler, RefusesEachBrokenRuleAndRecovers) {
  FrameAssembler a(AssemblerLimits{4, 16});
  struct Case {
    const char* what;
    Chunk first;
    Chunk second;  // step 0 means: only `first` is sent
    absl::StatusCode code;
  };
  const Case cases[] = {
      {"oversized chunk", Make(5, 0, 1, 5, "abcde"), {}, absl::StatusCode::kResourceExhausted},
      {"oversized frame", Make(5, 0, 9, 17, "ab"), {}, absl::StatusCode::kResourceExhausted},
      {"replayed step", Make(4, 0, 1, 2, "ab"), {}, absl::StatusCode::kFailedPrecondition},
      {"skipped step", Make(6, 0, 1, 2, "ab"), {}, absl::StatusCode::kFailedPrecondition},
      {"index out of range", Make(5, 2, 2, 2, "ab"), {}, absl::StatusCode::kInvalidArgument},
      {"not starting at 0", Make(5, 1, 2, 4, "ab"), {}, absl::StatusCode::kFailedPrecondition},
      {"chunk out of order", Make(5, 0, 3, 6, "ab"), Make(5, 2, 3, 6, "ab"),
       absl::StatusCode::kFailedPrecondition},
      {"step changes mid-frame", Make(5, 0, 2, 4, "ab"), Make(6, 1, 2, 4, "ab"),
       absl::StatusCode::kFailedPrecondition},
      {"more bytes than declared", Make(5, 0, 2, 3, "ab"), Make(5, 1, 2, 3, "ab"),
       absl::StatusCode::kInvalidArgument},
      {"fewer bytes than declared", Make(5, 0, 2, 8, "ab"), Make(5, 1, 2, 8, "ab"),
       absl::StatusCode::kInvalidArgument},
  };
  for (const Case& c : cases) {
    auto r = a.Add(c.first, 5);
    if (c.second.step != 0) {
      ASSERT_TRUE(r.ok()) << c.what << ": " << r.status();
      r = a.Add(c.second, 5);
    }
    EXPECT_EQ(r.status().code(), c.code) << c.what << ": " << r.status();
    EXPECT_FALSE(r.status().message().empty()) << c.what;
    EXPECT_FALSE(a.in_progress()) << c.what;
    EXPECT_EQ(a.buffered_bytes(), 0) << c.what;
    // Still usable: the due frame goes through.
    auto ok = a.Add(Make(5, 0, 1, 2, "ok"), 5);
    ASSERT_TRUE(ok.ok() && ok->has_value()) << c.what;
  }
}

}  // namespace
}  // namespace splitq::rpc
