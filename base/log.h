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

#include <string>

#include "absl/status/status.h"

namespace splitq::base {

// Sets the default logger: `level` debug | info | warn | error, `format` text | json
// (INVALID_ARGUMENT naming the flag otherwise; nothing changes then).
absl::Status ConfigureLogging(const std::string& level, const std::string& format);
// Whether log lines are JSON (then progress goes through the log too, one object per line).
bool LoggingAsJson();

}  // namespace splitq::base
