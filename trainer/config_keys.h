// splitq trainer, internal: the run config's key table (config.h). One row per key: its path,
// type, range, default and doc. The parser (ParseRunConfig), the reference (ConfigReference,
// docs/configuration.md) and the default column are all made from these rows, so they cannot
// drift apart. Checks that involve two keys follow the rows in ParseRunConfig.
//
// Not a public API: include it only from trainer/config.cc.
#pragma once

#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "trainer/config.h"

namespace splitq::trainer::internal {

enum class Kind { kInt, kNumber, kBool, kChoice, kText, kSchedule, kNames };

// A key's value as read from YAML.
struct Value {
  int64_t i = 0;
  double d = 0;
  bool b = false;
  std::string s;
  std::vector<std::string> names;
  YAML::Node node;
};

struct Key {
  const char* path;
  Kind kind;
  double lo = 0, hi = 0;             // kInt, kNumber: the range
  bool lo_open = false;              // kNumber: lo itself is outside
  bool zero_ok = false;              // kInt: 0 ("off") too
  std::vector<std::string> choices;  // kChoice, kNames
  const char* type = nullptr;        // the type column when the kind cannot say it (kText)
  // Stores a checked value (kSchedule: parses and checks it, against bits already stored).
  std::function<absl::Status(RunConfig&, const Value&)> set;
  // The value as the default column shows it.
  std::function<std::string(const RunConfig&)> get;
  const char* doc;
};

// 2^40: "no upper limit" for counts.
inline constexpr double kNoLimit = 1099511627776.0;

// Every key, in the order the parser reads them (bits before the schedules that use them).
const std::vector<Key>& Keys();
// A number as the table shows it (integers without a decimal point).
std::string Number(double v);
// The range of an int or number row, as errors and the reference show it (">= 1", "1..8",
// "0 or 2..8", "(0, 10]").
std::string RangeText(const Key& k);
// The type column ("integer 1..1024", "fp32 | uniform", "schedule", ...).
std::string TypeText(const Key& k);

}  // namespace splitq::trainer::internal
