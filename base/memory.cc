#include "base/memory.h"

#include <malloc.h>

#include <fstream>
#include <string>

namespace splitq::base {
namespace {
double StatusMiB(const std::string& key, const std::string& path = "/proc/self/status") {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key, 0) == 0) return std::stod(line.substr(key.size())) / 1024.0;
  }
  return -1;
}
}  // namespace

double PeakRssMiB() { return StatusMiB("VmHWM:"); }
double RssMiB() { return StatusMiB("VmRSS:"); }
double RssMiB(int pid) { return StatusMiB("VmRSS:", "/proc/" + std::to_string(pid) + "/status"); }

MemoryTrimmer::MemoryTrimmer(Options options)
    : options_(options),
      low_(RssMiB()),
      last_trim_(std::chrono::steady_clock::now()),
      last_renewal_(last_trim_) {}

bool MemoryTrimmer::Tick() {
  const auto now = std::chrono::steady_clock::now();
  if (now - last_trim_ < options_.every) return false;
  const bool renew = now - last_renewal_ >= options_.at_least;
  if (!renew && RssMiB() <= low_ + options_.above_mib) return false;
  malloc_trim(0);
  last_trim_ = std::chrono::steady_clock::now();
  const double after = RssMiB();
  if (renew) {
    low_ = after;
    last_renewal_ = last_trim_;
  } else if (after < low_) {
    low_ = after;
  }
  return true;
}

}  // namespace splitq::base
