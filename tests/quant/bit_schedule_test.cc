// Tests for quant/bit_schedule.h: curves, and config errors that name the key and value.
#include "quant/bit_schedule.h"

#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

namespace splitq::quant {
namespace {

absl::StatusOr<BitSchedule> Parse(const std::string& yaml) {
  return BitSchedule::FromYaml(YAML::Load(yaml), "quant.activations.target");
}

TEST(BitSchedule, DesignExampleCurves) {
  auto s =
      Parse("[{step: 0, bits: 8}, {step: 2000, bits: 4, curve: cosine}, {step: 6000, bits: 3}]");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_DOUBLE_EQ(s->TargetAt(0), 8);
  EXPECT_DOUBLE_EQ(s->TargetAt(1000), 6);  // cosine midpoint
  EXPECT_NEAR(s->TargetAt(500), 8 - 4 * (1 - std::cos(M_PI / 4)) / 2, 1e-12);
  EXPECT_DOUBLE_EQ(s->TargetAt(2000), 4);
  EXPECT_DOUBLE_EQ(s->TargetAt(4000), 3.5);  // linear by default
  EXPECT_DOUBLE_EQ(s->TargetAt(6000), 3);
  EXPECT_DOUBLE_EQ(s->TargetAt(100000), 3);
}

TEST(BitSchedule, StepCurveHoldsThenJumps) {
  auto s = Parse("[{step: 10, bits: 6}, {step: 20, bits: 4, curve: step}]");
  ASSERT_TRUE(s.ok());
  EXPECT_DOUBLE_EQ(s->TargetAt(0), 6);
  EXPECT_DOUBLE_EQ(s->TargetAt(19), 6);
  EXPECT_DOUBLE_EQ(s->TargetAt(20), 4);
}

TEST(BitSchedule, ConstantIsValidated) {
  EXPECT_TRUE(BitSchedule::Constant(4).ok());
  EXPECT_FALSE(BitSchedule::Constant(std::nan("")).ok());
  EXPECT_FALSE(BitSchedule::Constant(0).ok());
}

TEST(BitSchedule, ConstantFromANumber) {
  auto s = Parse("4");
  ASSERT_TRUE(s.ok());
  EXPECT_DOUBLE_EQ(s->TargetAt(12345), 4);
}

void ExpectError(const std::string& yaml, const std::string& needle) {
  auto s = Parse(yaml);
  ASSERT_FALSE(s.ok()) << yaml;
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find(needle), std::string::npos)
      << "message: " << s.status().message() << "\nexpected to contain: " << needle;
}

TEST(BitSchedule, ErrorsNameTheKeyAndValue) {
  ExpectError("[{step: 0, bits: 8, curv: linear}]",
              "quant.activations.target[0].curv: unknown key");
  ExpectError("[{step: 0, bits: 8}, {step: 0, bits: 4}]",
              "quant.activations.target[1].step: 0 does not come after");
  ExpectError("[{step: 100, bits: 8}, {step: 50, bits: 4}]", "target[1].step: 50");
  ExpectError("[{step: 0, bits: 9}]", "quant.activations.target[0].bits: 9 is outside");
  ExpectError("[{step: 0, bits: 0.5}]", "target[0].bits: 0.5 is outside");
  ExpectError("[{step: 0, bits: eight}]", "target[0].bits: expected a number, got 'eight'");
  ExpectError("[{step: -1, bits: 8}]", "target[0].step: -1 is negative");
  ExpectError("[{step: 1.5, bits: 8}]", "target[0].step: expected a whole number");
  ExpectError("[{step: 0, bits: 8, curve: exp}]", "'exp' is not a curve");
  ExpectError("[{bits: 8}]", "target[0].step: missing");
  ExpectError("[]", "needs at least one point");
  ExpectError("{a: 1}", "expected a list");
}

TEST(BitSchedule, RespectsCallerBounds) {
  auto s = BitSchedule::FromYaml(YAML::Load("[{step: 0, bits: 8}, {step: 10, bits: 2}]"),
                                 "quant.gradients.target", 4, 8);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find(
                "quant.gradients.target[1].bits: 2 is outside the allowed range [4, 8]"),
            std::string::npos)
      << s.status();
}

}  // namespace
}  // namespace splitq::quant
