// `splitq bench coding --config F [--set k=v ...] [--init CKPT] [--steps N] [--frames K]
// [--iters I] [--dump DIR]`: entropy coding (quant/entropy_coding.h) on the frames a real run
// sends. Trains the config for N steps in one process (SplitTrainer, the wire packed, not
// coded), keeps the last K steps' activation and gradient frames, and reports per direction:
// the packed payload, the order-0 entropy of the codes (one histogram per channel), the rANS
// coded payload, their ratio, the frame headers, and the coder's encode and decode time per
// code on one thread (median of I calls per frame). Every coded frame is decoded and compared
// with the packed one (a mismatch is an error).
//
// --dump DIR writes, per kept frame, DIR/<way>_<i>.packed (the packed payload) and
// DIR/<way>_<i>.codes (the codes, one byte each, channel after channel), and DIR/summary.txt
// (elements and bytes per way), so that other coders can be run on the same bytes:
// scripts/coding-vs-zstd.sh runs zstd on them.
#pragma once

#include <string>
#include <vector>

namespace splitq::tools {

struct CodingBenchOptions {
  std::string config_path;
  std::vector<std::string> overrides;
  std::string init;
  int steps = 200;
  int frames = 10;
  int iters = 5;
  std::string dump_dir;
};

// Runs it; returns the process exit code (errors are logged).
int RunCodingBench(const CodingBenchOptions& options);

}  // namespace splitq::tools
