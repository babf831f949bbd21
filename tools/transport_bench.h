// splitq tools: the transport benchmark behind `splitq bench transport`: frame streaming
// over gRPC on loopback against a raw TCP socket moving the same bytes, in the same run.
//
// Both sides follow the worker protocol's rule of one frame in flight: the client sends a
// frame, the server reads all of it and answers, then the next frame goes.
//   gRPC  the Worker.Train bidirectional stream of proto/splitq/v1/worker.proto, each frame as
//         FrameChunk messages of `chunk_bytes`, answered by a StepResult. By default it is
//         what a session does: one stream, the client's chunk size (1 MiB), chunks encoded
//         and decoded without copies (chunk_codec.h) and reassembled into the frame, and a
//         server on the callback API with one read outstanding, like WorkerService.
//         `protobuf_messages` sends and reads them through the generated classes instead (four
//         copies of the data; what sessions did before chunk_codec.h), for comparison.
//   TCP   an 8-byte length, the bytes, and a 1-byte answer, TCP_NODELAY, one connection.
// Both are plaintext: this measures the framework, not TLS. For each frame size the two
// alternate for three rounds and each keeps its best round. Issue 4's target: gRPC at least
// 80% of raw TCP for frames of 1 MiB or more.
//
// `sessions` > 1 is a worker's aggregate ingest: that many independent sessions (one stream
// each, on its own connection, one frame in flight, all started together) into the one
// server, against as many raw TCP connections moving the same bytes, each served by its own
// thread; the rates are the sum over sessions (all the bytes over the slowest one's time).
// The worker-group issue's target: 16 sessions at least 80% of 16 TCP connections.
//
// `streams` > 1 is an experiment, not what a session does today: each frame's chunks are dealt
// round-robin over that many Train streams, each on its own HTTP/2 connection, sent by one
// thread per stream; the frame is done when every stream has answered.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace splitq::tools {

struct TransportOptions {
  int mib_per_size = 256;          // about this many MiB per frame size and round (>= 4 frames)
  int64_t chunk_bytes = 1 << 20;   // FrameChunk.data size, 1 KiB .. 4 MiB
  int streams = 1;                 // 1 .. 16; > 1 stripes each frame (see above)
  int sessions = 1;                // 1 .. 64; > 1: aggregate ingest (see above; streams 1)
  bool callback_server = true;     // false: the sync server API (needs protobuf_messages)
  bool protobuf_messages = false;  // chunks through the generated classes, not chunk_codec.h
  // gRPC channel arguments (name, integer value) for both the server and the client channels,
  // e.g. {"grpc.http2.max_frame_size", 1 << 20}: for tuning experiments.
  std::vector<std::pair<std::string, int>> grpc_args;
  // Frame sizes in bytes, each 1 KiB .. 64 MiB; empty: 64 KiB, 256 KiB, 1 MiB, 4 MiB, 16 MiB.
  std::vector<int64_t> frame_sizes;
};

struct TransportResult {
  int64_t frame_bytes = 0;
  int frames = 0;        // per round (and per session)
  double grpc_mb_s = 0;  // 1e6 bytes per second
  double tcp_mb_s = 0;
};

// One result per frame size, in order. INVALID_ARGUMENT for options out of range.
absl::StatusOr<std::vector<TransportResult>> RunTransportBench(const TransportOptions& options);

}  // namespace splitq::tools
