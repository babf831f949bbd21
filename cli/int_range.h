// splitq CLI: whole-number option checks, without libtorch (the small splitq-health binary
// uses them too).
#pragma once

#include <CLI/CLI.hpp>
#include <charconv>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace splitq::cli {

// `text` as a whole number (digits with an optional '-', nothing else), or nullopt.
inline std::optional<int64_t> ParseWholeNumber(std::string_view text) {
  int64_t v = 0;
  const char* end = text.data() + text.size();
  const auto [at, error] = std::from_chars(text.data(), end, v);
  if (text.empty() || error != std::errc() || at != end) return std::nullopt;
  return v;
}

// An integer option's check: "Value abc is not a whole number", or "Value 9 not in range 1 to
// 4" (CLI::Range alone calls both "not in range"). Its description is "INT in [lo - hi]".
inline CLI::Validator IntRange(int64_t lo, int64_t hi) {
  return CLI::Validator(
      [lo, hi](std::string& text) -> std::string {
        const std::optional<int64_t> parsed = ParseWholeNumber(text);
        if (!parsed) return "Value " + text + " is not a whole number";
        if (const int64_t v = *parsed; v < lo || v > hi) {
          return "Value " + text + " not in range " + std::to_string(lo) + " to " +
                 std::to_string(hi);
        }
        return std::string();
      },
      "INT in [" + std::to_string(lo) + " - " + std::to_string(hi) + "]");
}

}  // namespace splitq::cli
