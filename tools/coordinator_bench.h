// splitq tools: the coordinator load benchmark behind `splitq bench coordinator` (issue 21).
//
// The coordinator runs as a child process (`splitq coordinator`, this same binary, plaintext on
// loopback, with a tokens file naming every simulated member and its role), so the server's
// CPU per call is read from the child's /proc/PID/stat (utime + stime, 10 ms ticks) and its
// RSS from /proc/PID/status, apart from the generator's. The generator is in this process:
// gRPC's callback API over `channels` HTTP/2 connections, a call issued as soon as one of
// `window` slots is free (closed loop: the most calls per second), or paced to a rate (open
// loop: the latency at that load). Latency is from issuing a call to its completion, as the
// generator sees it (so it includes the generator's own queueing on a busy machine).
//
// First, rows "core ...": the registry alone (CoordinatorCore in this process, one thread, no
// gRPC, no tokens) with the same members: wall time per call of Register, Assign (a pick, then
// a move away from each client's worker), Heartbeat, a whole Status and one Expire of everyone.
// Then the service, phases in order (each a row):
//   register      `members` members (`workers` workers first, then clients), in ten slices:
//                 the rate must stay flat from 0 to `members`
//   assign        every client once, each one a pick of the least-loaded worker with room
//   heartbeat     round robin over all members, closed loop, `seconds`
//   heartbeat@R   the same at `rate` calls/s, open loop
//   mix@R         the same rate, one call in 20 an Assign naming its worker unreachable (so it
//                 must pick another): heartbeat and Assign latencies apart
//   status        the whole registry in pages of 10,000 while heartbeats run at `rate`
//   churn         `seconds` twice: members of a separate pool leave and register again while
//                 heartbeats run (each cycle is 2 calls); the second half must cost what the
//                 first did, and the RSS stay flat (dead records are forgotten after
//                 `forget_after_s`)
//   connections   `connections` more connections, one heartbeat each, then closed: the
//                 coordinator's RSS before, with them open, and a heartbeat period + 2 s after
//                 they closed (the coordinator returns freed memory at its expiry passes)
//   expire        nobody speaks for four heartbeat periods and forget_after_s: every member
//                 must be marked dead and its record forgotten (live and records printed)
// The coordinator beats at `heartbeat_ms` (deadline twice that): long enough that a member
// stays alive between the phases that speak for it.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace splitq::tools {

struct CoordinatorBenchOptions {
  std::string splitq;  // the splitq binary that runs the coordinator ("" = this one)
  int members = 100000;
  int workers = 256;
  int seconds = 5;   // per timed phase
  int rate = 50000;  // calls/s of the paced phases
  int window = 512;  // calls in flight at most
  int channels = 8;  // HTTP/2 connections
  // Threads that issue calls, each with its share of the window and of the rate (one thread
  // issues ~40k calls/s on the 16-core GPU host: more to load a coordinator that has cores).
  int generator_threads = 1;
  int heartbeat_ms = 15000;
  int forget_after_s = 2;
  int churn_pool = 20000;  // names that leave and come back in the churn phase
  int connections = 2000;  // the connections phase's extra connections (0: skip it)
  // > 0: the coordinator's threads on CPUs 0..coordinator_cpus-1 and the generator's on the
  // others (threads started later inherit), so the two do not compete for a core: the
  // server's CPU per call without the generator's interference, and its capacity on that many
  // cores.
  int coordinator_cpus = 0;
  int grpc_memory_mib = 0;  // the coordinator's --grpc-memory-mib (0: none, its default)
  bool expire = true;       // run the expire phase (it waits 4 heartbeat periods + forget)
  std::function<void(const std::string&)> progress;  // a line per phase (stderr)
};

struct CoordinatorBenchRow {
  std::string phase;
  uint64_t calls = 0, errors = 0;  // errors: of every kind of call in the phase
  std::string first_error;
  double seconds = 0;
  double p50_us = 0, p99_us = 0, p999_us = 0, max_us = 0;
  double server_cpu_us_per_call = 0;  // the coordinator's CPU over the phase / calls
  double rss_mb = 0;                  // the coordinator's RSS at the phase's end
  uint64_t live = 0, records = 0;     // Status totals at the phase's end
  double calls_per_s() const { return seconds > 0 ? calls / seconds : 0; }
};

absl::StatusOr<std::vector<CoordinatorBenchRow>> RunCoordinatorBench(
    const CoordinatorBenchOptions& options);
std::string FormatCoordinatorBench(const std::vector<CoordinatorBenchRow>& rows);
std::string CoordinatorBenchJson(const std::vector<CoordinatorBenchRow>& rows,
                                 const CoordinatorBenchOptions& options);

}  // namespace splitq::tools
