// gRPC's core count, from the CPUs this process may run on.
//
// gRPC 1.51 (Debian 12) sizes its thread pools from gpr_cpu_num_cores(), which it computes
// as sysconf(_SC_NPROCESSORS_CONF): the machine's CPUs, whatever the affinity mask says. A
// callback-API server then runs cores/2 (2..16) polling threads, plus an executor and an
// EventEngine pool of about `cores` threads each. Started with `taskset -c 0,1` on a 16-core
// host, the coordinator ran 8 pollers on 2 CPUs and spent 33-41 us of CPU per heartbeat,
// against 23-29 us on a 2-core machine (docs/benchmarks.md, "The coordinator").
//
// gRPC has no setting for it (no environment variable, no channel argument; grpc/grpc#40991).
// The function is exported by libgpr and called by libgrpc and libgrpc++ through the dynamic
// linker, so this definition in the `splitq` executable takes its place: the CPUs in the
// affinity mask when the process first asks (CPU quotas of cgroups are not looked at). A
// gRPC that calls it from inside libgpr only, or a static gRPC, would ignore this, harmlessly.
#include <sched.h>
#include <unistd.h>

extern "C" unsigned gpr_cpu_num_cores(void) {
  static const unsigned cores = [] {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
      const int n = CPU_COUNT(&set);
      if (n > 0) return static_cast<unsigned>(n);
    }
    const long online = sysconf(_SC_NPROCESSORS_ONLN);
    return online > 0 ? static_cast<unsigned>(online) : 1u;
  }();
  return cores;
}
