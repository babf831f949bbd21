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
    : options_(options), rss_after_trim_(RssMiB()), last_trim_(std::chrono::steady_clock::now()) {}

bool MemoryTrimmer::Tick() {
  const auto now = std::chrono::steady_clock::now();
  if (now - last_trim_ < options_.every) return false;
  if (RssMiB() <= rss_after_trim_ + options_.above_mib && now - last_trim_ < options_.at_least) {
    return false;
  }
  malloc_trim(0);
  last_trim_ = std::chrono::steady_clock::now();
  rss_after_trim_ = RssMiB();
  return true;
}

}  // namespace splitq::base
