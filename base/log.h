// splitq base: the process's log. Every `splitq` process logs through spdlog's default logger,
// on stderr, with a level (debug, info, warn, error) and one of two formats:
//   text  the message as it is (what a person reads; the lines tests and docs quote)
//   json  one object per line: {"time": ISO 8601 with milliseconds, "level" (debug, info,
//         warning, error), "msg"} for machines (log shippers, `docker compose logs` piped to
//         jq); progress lines are log lines then too
// `splitq --log-level L --log-format F SUBCOMMAND ...` (either side of the subcommand) sets them.
// Results (a run's summary, a benchmark's table, `splitq config reference`) are not log lines:
// commands print them on stdout.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>

#include "absl/status/status.h"

namespace splitq::base {

// Sets the default logger: `level` debug | info | warn | error, `format` text | json
// (INVALID_ARGUMENT naming the flag otherwise; nothing changes then).
absl::Status ConfigureLogging(const std::string& level, const std::string& format);
// Whether log lines are JSON (then progress goes through the log too, one object per line).
bool LoggingAsJson();

// A rate limit for log lines that peers can cause (a worker's session lines: one client token
// opened 2,000 sessions in 5.6 s in the sixth outside probe, ~700 lines a second): at most
// `per_second` lines a second on average, in bursts of up to `burst`. Take() says whether a
// line may go out now; the refused ones are counted, and the next line that goes out is told how
// many (so that it can say so). Thread-safe.
class LineBudget {
 public:
  LineBudget(double per_second, double burst);
  // True if a line may be logged now; then *suppressed is how many were refused since the
  // last line that went out.
  bool Take(int64_t* suppressed);

 private:
  std::mutex mutex_;
  const double per_second_, burst_;
  double tokens_;
  std::chrono::steady_clock::time_point last_;
  int64_t suppressed_ = 0;
};

}  // namespace splitq::base
