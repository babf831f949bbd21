#include "base/memory.h"

#include <fstream>
#include <string>

namespace splitq::base {
namespace {
double StatusMiB(const std::string& key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key, 0) == 0) return std::stod(line.substr(key.size())) / 1024.0;
  }
  return -1;
}
}  // namespace

double PeakRssMiB() { return StatusMiB("VmHWM:"); }
double RssMiB() { return StatusMiB("VmRSS:"); }

}  // namespace splitq::base
