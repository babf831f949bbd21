// splitq base: this process's memory, from /proc/self/status.
#pragma once

namespace splitq::base {

// The peak resident set (VmHWM) in MiB, or -1 when /proc is not readable.
double PeakRssMiB();
// The resident set now (VmRSS) in MiB, or -1.
double RssMiB();
// The resident set now of process `pid` (/proc/PID/status), in MiB, or -1.
double RssMiB(int pid);

}  // namespace splitq::base
