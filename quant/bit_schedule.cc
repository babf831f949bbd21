#include "quant/bit_schedule.h"

#include <yaml-cpp/yaml.h>

#include <cmath>

#include "absl/strings/str_cat.h"

namespace splitq::quant {
namespace {

std::string Scalar(const YAML::Node& node) {
  return node.IsScalar() ? node.Scalar() : std::string("<") + (node.IsMap() ? "map" : "list") + ">";
}

absl::StatusOr<double> ParseNumber(const YAML::Node& node, const std::string& key) {
  if (!node.IsScalar())
    return absl::InvalidArgumentError(key + ": expected a number, got a " + Scalar(node));
  try {
    return node.as<double>();
  } catch (const YAML::Exception&) {
    return absl::InvalidArgumentError(key + ": expected a number, got '" + node.Scalar() + "'");
  }
}

absl::StatusOr<SchedulePoint> ParsePoint(const YAML::Node& node, const std::string& key) {
  if (!node.IsMap()) {
    return absl::InvalidArgumentError(key + ": expected a map like {step: 0, bits: 8}, got '" +
                                      Scalar(node) + "'");
  }
  SchedulePoint point;
  bool has_step = false, has_bits = false;
  for (const auto& entry : node) {
    const std::string name = entry.first.as<std::string>();
    const std::string sub = key + "." + name;
    if (name == "step") {
      long long step = 0;
      try {
        step = entry.second.as<long long>();
      } catch (const YAML::Exception&) {
        return absl::InvalidArgumentError(sub + ": expected a whole number of steps, got '" +
                                          Scalar(entry.second) + "'");
      }
      if (step < 0)
        return absl::InvalidArgumentError(absl::StrCat(sub, ": ", step, " is negative"));
      point.step = step;
      has_step = true;
    } else if (name == "bits") {
      auto bits = ParseNumber(entry.second, sub);
      if (!bits.ok()) return bits.status();
      point.bits = *bits;
      has_bits = true;
    } else if (name == "curve") {
      const std::string curve = Scalar(entry.second);
      if (curve == "linear") {
        point.curve = Curve::kLinear;
      } else if (curve == "cosine") {
        point.curve = Curve::kCosine;
      } else if (curve == "step") {
        point.curve = Curve::kStep;
      } else {
        return absl::InvalidArgumentError(sub + ": '" + curve +
                                          "' is not a curve (expected linear, cosine or step)");
      }
    } else {
      return absl::InvalidArgumentError(sub + ": unknown key (value '" + Scalar(entry.second) +
                                        "'; expected step, bits or curve)");
    }
  }
  if (!has_step) return absl::InvalidArgumentError(key + ".step: missing");
  if (!has_bits) return absl::InvalidArgumentError(key + ".bits: missing");
  return point;
}

}  // namespace

absl::StatusOr<BitSchedule> BitSchedule::FromPoints(std::vector<SchedulePoint> points,
                                                    const std::string& key_path, double min_bits,
                                                    double max_bits) {
  if (points.empty()) return absl::InvalidArgumentError(key_path + ": needs at least one point");
  const double lo = std::max(kLowestBits, min_bits), hi = std::min(8.0, max_bits);
  for (size_t i = 0; i < points.size(); ++i) {
    const std::string key = absl::StrCat(key_path, "[", i, "]");
    if (!std::isfinite(points[i].bits) || points[i].bits < lo || points[i].bits > hi) {
      return absl::InvalidArgumentError(absl::StrCat(
          key, ".bits: ", points[i].bits, " is outside the allowed range [", lo, ", ", hi, "]"));
    }
    if (points[i].step < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(key, ".step: ", points[i].step, " is negative"));
    }
    if (i > 0 && points[i].step <= points[i - 1].step) {
      return absl::InvalidArgumentError(absl::StrCat(
          key, ".step: ", points[i].step, " does not come after the previous point's step ",
          points[i - 1].step, " (steps must increase)"));
    }
  }
  BitSchedule schedule;
  schedule.points_ = std::move(points);
  return schedule;
}

absl::StatusOr<BitSchedule> BitSchedule::FromYaml(const YAML::Node& node,
                                                  const std::string& key_path, double min_bits,
                                                  double max_bits) {
  if (!node.IsDefined() || node.IsNull()) return absl::InvalidArgumentError(key_path + ": missing");
  std::vector<SchedulePoint> points;
  if (node.IsScalar()) {
    auto bits = ParseNumber(node, key_path);
    if (!bits.ok()) return bits.status();
    points.push_back(SchedulePoint{0, *bits, Curve::kLinear});
  } else if (node.IsSequence()) {
    for (size_t i = 0; i < node.size(); ++i) {
      auto point = ParsePoint(node[i], absl::StrCat(key_path, "[", i, "]"));
      if (!point.ok()) return point.status();
      points.push_back(*point);
    }
  } else {
    return absl::InvalidArgumentError(
        key_path + ": expected a list of {step, bits, curve} points or a number");
  }
  return FromPoints(std::move(points), key_path, min_bits, max_bits);
}

absl::StatusOr<BitSchedule> BitSchedule::Constant(double bits) {
  return FromPoints({SchedulePoint{0, bits, Curve::kLinear}}, "constant");
}

double BitSchedule::TargetAt(int64_t step) const {
  if (step <= points_.front().step) return points_.front().bits;
  for (size_t i = 1; i < points_.size(); ++i) {
    const SchedulePoint& a = points_[i - 1];
    const SchedulePoint& b = points_[i];
    if (step >= b.step) continue;
    const double t = static_cast<double>(step - a.step) / static_cast<double>(b.step - a.step);
    switch (b.curve) {
      case Curve::kLinear:
        return a.bits + (b.bits - a.bits) * t;
      case Curve::kCosine:
        return a.bits + (b.bits - a.bits) * (1.0 - std::cos(M_PI * t)) / 2.0;
      case Curve::kStep:
        return a.bits;
    }
  }
  return points_.back().bits;
}

}  // namespace splitq::quant
