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
// most every `every`, when the RSS has grown `above_mib` since the last trim, and at least every
// `at_least` (memory freed after a trim does not show in the RSS). Not thread-safe: one caller
// (a periodic loop) per trimmer.
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
  double rss_after_trim_;
  std::chrono::steady_clock::time_point last_trim_;
};

}  // namespace splitq::base
