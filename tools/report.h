// splitq tools: `splitq report`, one self-contained HTML page of one or more runs' outputs
// (issue 18, first part).
//
// A run directory is what `splitq train`, `splitq client` or `splitq demo` wrote with --out:
// metrics.jsonl (one line every metrics.every steps), validation.jsonl (one line per
// validation) and summary.json (at the end; optional, so that a run still going can be
// looked at). The page has, for every run side by side (one colour each):
//   - training loss over steps;
//   - validation loss, and accuracy (Fashion-MNIST) or bits per byte (language model);
//   - the bits per element in use, activations and gradients (act_bits, grad_bits), over
//     steps, against the budgets (act_budget, grad_budget: the budget of each logged window;
//     runs that did not log them get their final budgets from summary.json as lines);
//   - per run, a map of the activation bits per channel over steps (act_bit_map: one digit a
//     channel on each metrics line), at most 300 columns and 128 rows (rows of many channels
//     are their mean);
//   - wire bits per element up and down (bytes on the wire x 8 / elements, everything
//     counted) against the codes' entropy, over steps;
//   - step time over steps;
//   - a table of the summaries (bytes up/down against the fp32 equivalent, wall time, ...).
// Charts are inline SVG: the file fetches nothing and runs no script. Every plotted point
// carries its value (a <title> a browser shows on hover), and every chart its data as
// data-series attributes, so tests and scripts can read the numbers back.
//
// Not yet: a step-time breakdown (the runs do not log it), and a test in a real browser.
//
// The reader takes the flat JSON objects splitq writes (string keys; values numbers, null,
// true/false, strings without escapes beyond \" and \\, or arrays of numbers or of such
// arrays, kept as their text); anything else is refused with the file and line.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace splitq::tools {

// One line of a .jsonl file or summary.json: numeric fields (null fields are left out) and
// string fields (arrays too, as their JSON text).
struct FlatRecord {
  std::map<std::string, double> numbers;
  std::map<std::string, std::string> strings;
};

// Parses one flat JSON object. INVALID_ARGUMENT names the column where it went wrong.
absl::StatusOr<FlatRecord> ParseFlatJson(const std::string& text);

struct RunData {
  std::string name;                 // the directory's last component (or the path if none)
  std::vector<FlatRecord> metrics;  // metrics.jsonl, in file order
  std::vector<FlatRecord> validation;
  FlatRecord summary;  // empty when summary.json is missing
  bool has_summary = false;
};

// Reads a run directory. NOT_FOUND when it has neither metrics.jsonl nor validation.jsonl;
// INVALID_ARGUMENT (file:line) for a line that does not parse. A last line cut short (a run
// still writing) is skipped.
absl::StatusOr<RunData> ReadRun(const std::string& dir);

// The HTML page of the runs (at least one).
std::string RenderReport(const std::vector<RunData>& runs);

// Reads every directory and writes the page to `out` (atomically). Errors name the
// directory or file.
absl::Status WriteReport(const std::vector<std::string>& dirs, const std::string& out);

}  // namespace splitq::tools
