// splitq base: this process's memory, from /proc/self/status.
#pragma once

#include <chrono>

namespace splitq::base {

// The peak resident set (VmHWM) in MiB, or -1 when /proc is not readable.
double PeakRssMiB();
// The resident set now (VmRSS) in MiB, or -1.
double RssMiB();
// The resident set now of process `pid` (/proc/PID/status), in MiB, or -1.
double RssMiB(int pid);

// Gives memory this process freed back to the system (glibc's malloc_trim), for the long-lived
// servers: `splitq` raises glibc's trim threshold for the trainer's sake, so freed heap memory
// (closed connections, cancelled requests, forgotten records) otherwise stays in the RSS. A trim
// locks each arena while it walks it (12-48 ms with 100k coordinator members), so Tick trims at
// most every `every`, when the RSS is `above_mib` over its low mark, and at least every
// `at_least`. The low mark is the lowest RSS right after a trim, renewed at each `at_least`
// trim: a trim at the peak of a flood (the memory still in use) does not raise it, so what the
// flood frees afterwards is trimmed within `every`, although freed memory does not show in the
// RSS (the third outside probe saw a trimmer that remembered the RSS after its last trim keep
// 2.4 GB for minutes). Not thread-safe: one caller (a periodic loop) per trimmer.
class MemoryTrimmer {
 public:
  struct Options {
    double above_mib = 32;
    std::chrono::seconds every{30};
    std::chrono::seconds at_least{300};
  };
  MemoryTrimmer() : MemoryTrimmer(Options{}) {}
  explicit MemoryTrimmer(Options options);
  // Trims when the policy says so; true when it did.
  bool Tick();

 private:
  Options options_;
  double low_;  // the low mark (MiB)
  std::chrono::steady_clock::time_point last_trim_, last_renewal_;
};

}  // namespace splitq::base
