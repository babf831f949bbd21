// tools/transport_bench.h end to end on loopback: every variant moves every frame size, only
// the sizes asked for are measured, and options out of range are refused. Speeds are printed
// by `splitq bench transport`, never asserted.
#include "tools/transport_bench.h"

#include <gtest/gtest.h>

#include <cstdint>

namespace splitq::tools {
namespace {

// The transport benchmark runs end to end on loopback (its speed is printed by
// `splitq bench transport`, not asserted here): as a session streams (zero-copy chunks), striped,
// and through the generated classes on both server APIs; one with a gRPC argument.
TEST(TransportBench, MovesEveryFrameSizeOverBothTransports) {
  struct Variant {
    int streams;
    bool protobuf, callback;
  };
  for (const Variant v : {Variant{1, false, true}, Variant{3, false, true}, Variant{2, true, true},
                          Variant{1, true, false}}) {
    TransportOptions options;
    options.mib_per_size = 1;
    options.streams = v.streams;
    options.chunk_bytes = v.streams == 1 ? (1 << 20) : (64 << 10);
    options.protobuf_messages = v.protobuf;
    options.callback_server = v.callback;
    if (v.streams == 3) options.grpc_args = {{"grpc.http2.max_frame_size", 1 << 20}};
    auto results = RunTransportBench(options);
    ASSERT_TRUE(results.ok()) << results.status();
    const int streams = v.streams;
    ASSERT_EQ(results->size(), 5u);
    for (const TransportResult& r : *results) {
      EXPECT_GE(r.frames, 4);
      EXPECT_GT(r.grpc_mb_s, 0.0) << r.frame_bytes << " over " << streams;
      EXPECT_GT(r.tcp_mb_s, 0.0) << r.frame_bytes;
    }
  }
}

// Only the frame sizes asked for, in their order; a frame smaller than a chunk is one chunk.
TEST(TransportBench, MeasuresTheFrameSizesAskedFor) {
  TransportOptions options;
  options.mib_per_size = 1;
  options.frame_sizes = {int64_t{3} << 20, 1024, int64_t{1} << 20};
  auto results = RunTransportBench(options);
  ASSERT_TRUE(results.ok()) << results.status();
  ASSERT_EQ(results->size(), 3u);
  EXPECT_EQ((*results)[0].frame_bytes, int64_t{3} << 20);
  EXPECT_EQ((*results)[1].frame_bytes, 1024);
  EXPECT_EQ((*results)[2].frame_bytes, int64_t{1} << 20);
  for (const TransportResult& r : *results) EXPECT_GT(r.grpc_mb_s, 0.0) << r.frame_bytes;
}

// A worker's aggregate ingest: several sessions at once against as many TCP connections.
TEST(TransportBench, MovesConcurrentSessions) {
  TransportOptions options;
  options.mib_per_size = 1;
  options.sessions = 4;
  options.frame_sizes = {int64_t{1} << 20};
  auto results = RunTransportBench(options);
  ASSERT_TRUE(results.ok()) << results.status();
  ASSERT_EQ(results->size(), 1u);
  EXPECT_GE((*results)[0].frames, 4);
  EXPECT_GT((*results)[0].grpc_mb_s, 0.0);
  EXPECT_GT((*results)[0].tcp_mb_s, 0.0);
}

TEST(TransportBench, RefusesOptionsOutOfRange) {
  TransportOptions small_chunk, many_streams, no_mib, sync_raw, tiny_frame, huge_frame,
      many_sessions, sessions_and_streams;
  many_sessions.sessions = 65;
  sessions_and_streams.sessions = 2;
  sessions_and_streams.streams = 2;
  small_chunk.chunk_bytes = 100;
  many_streams.streams = 17;
  no_mib.mib_per_size = 0;
  sync_raw.callback_server = false;  // the sync sink reads protobuf messages only
  tiny_frame.frame_sizes = {1 << 20, 1023};
  huge_frame.frame_sizes = {(int64_t{64} << 20) + 1};
  for (const TransportOptions& o : {small_chunk, many_streams, no_mib, sync_raw, tiny_frame,
                                    huge_frame, many_sessions, sessions_and_streams}) {
    EXPECT_EQ(RunTransportBench(o).status().code(), absl::StatusCode::kInvalidArgument);
  }
}

}  // namespace
}  // namespace splitq::tools
