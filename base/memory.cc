#include "base/memory.h"

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

}  // namespace splitq::base
