// splitq server: the transport benchmark behind `splitq bench transport`: frame streaming
// over gRPC on loopback against a raw TCP socket moving the same bytes, in the same run.
//
// Both sides follow the worker protocol's rule of one frame in flight: the client sends a
// frame, the server reads all of it and answers, then the next frame goes.
//   gRPC  the Worker.Train bidirectional stream of proto/splitq/v1/worker.proto (sync API),
//         each frame as FrameChunk messages of at most 4 MiB, answered by a StepResult.
//   TCP   an 8-byte length, the bytes, and a 1-byte answer, TCP_NODELAY.
// Both are plaintext: this measures the framework, not TLS. For each frame size the two
// alternate for three rounds and each keeps its best round. Issue 4's target: gRPC at least
// 80% of raw TCP for frames of 1 MiB or more.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"

namespace splitq::server {

struct TransportResult {
  int64_t frame_bytes = 0;
  int frames = 0;        // per round
  double grpc_mb_s = 0;  // 1e6 bytes per second
  double tcp_mb_s = 0;
};

// Frame sizes 64 KiB, 256 KiB, 1 MiB, 4 MiB, 16 MiB; about `mib_per_size` MiB per size and
// round (at least 4 frames).
absl::StatusOr<std::vector<TransportResult>> RunTransportBench(int mib_per_size);

}  // namespace splitq::server
