// splitq quant: BitSchedule, the bit budget B*(t) as a function of the training step.
//
// YAML (design.md, "Schedules"): a list of points, or one number for a constant budget:
//   target: [{step: 0, bits: 8}, {step: 2000, bits: 4, curve: cosine}, {step: 6000, bits: 3}]
// Each point's `curve` says how the budget goes from the previous point to it:
//   linear (default)  straight line
//   cosine            b0 + (b1 - b0) * (1 - cos(pi * t)) / 2,  t in [0, 1]
//   step              b0 until the point's step, then b1
// Before the first point the budget is the first point's bits; after the last, the last's.
// Rules (each violation is INVALID_ARGUMENT naming the key path and the value):
//   keys are step (integer >= 0), bits (number in [min, max]: 1..8 unless the caller gives
//   another min, at least kLowestBits),
//   curve (linear | cosine | step); no other key; at least one point; steps strictly
//   increasing.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace YAML {
class Node;
}

namespace splitq::quant {

enum class Curve : uint8_t { kLinear = 0, kCosine = 1, kStep = 2 };

struct SchedulePoint {
  int64_t step = 0;              // training step (steps)
  double bits = 8;               // mean bits per value at that step
  Curve curve = Curve::kLinear;  // how the budget reaches this point from the previous one
};

class BitSchedule {
 public:
  // The lowest budget any schedule may ask for: below 1 only a budget in coded bits
  // (quant.activations.budget: bytes) can mean it, and its caller passes such a min_bits.
  static constexpr double kLowestBits = 0.1;
  // `key_path` names the node in messages (e.g. "quant.activations.target"); the budget
  // must lie in [min_bits, max_bits] (a subset of [kLowestBits, 8]).
  static absl::StatusOr<BitSchedule> FromYaml(const YAML::Node& node, const std::string& key_path,
                                              double min_bits = 1, double max_bits = 8);
  static absl::StatusOr<BitSchedule> FromPoints(std::vector<SchedulePoint> points,
                                                const std::string& key_path = "target",
                                                double min_bits = 1, double max_bits = 8);
  // A constant budget (bits in 1..8, else INVALID_ARGUMENT).
  static absl::StatusOr<BitSchedule> Constant(double bits);

  // B*(step).
  double TargetAt(int64_t step) const;
  const std::vector<SchedulePoint>& points() const { return points_; }

 private:
  std::vector<SchedulePoint> points_;
};

}  // namespace splitq::quant
