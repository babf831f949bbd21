// kernels/op_table.h: every shape makes a valid layout, case names are unique and parse back
// to their parts, byte counts follow the op, and mixed widths are seeded and in range.
#include "kernels/op_table.h"

#include <gtest/gtest.h>

#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"

namespace splitq::kernels {
namespace {

TEST(OpTable, EveryShapeMakesALayout) {
  std::vector<ShapeCase> all = TestShapes();
  for (const ShapeCase& s : LargeTestShapes()) all.push_back(s);
  for (const Device d : {Device::kCpu, Device::kCuda}) {
    for (const auto& [s, dtypes] : PerfShapes(d)) {
      all.push_back(s);
      EXPECT_FALSE(dtypes.empty()) << s.name;
    }
  }
  std::set<std::string> names;
  for (const ShapeCase& s : all) {
    const auto layout = MakeGroupLayout(s.shape, s.granularity, s.axis);
    ASSERT_TRUE(layout.ok()) << s.name << ": " << layout.status();
    EXPECT_EQ(layout->numel(), s.numel()) << s.name;
    EXPECT_EQ(s.name.find(':'), std::string::npos) << s.name;
  }
  const std::vector<int> bits = TestBits();
  EXPECT_EQ(std::set<int>(bits.begin(), bits.end()).size(), bits.size());
  for (const int b : bits) EXPECT_TRUE(b == 0 || (b >= 1 && b <= 8)) << b;
}

TEST(OpTable, PerfCaseNamesAreUniqueAndParse) {
  for (const Device d : {Device::kCpu, Device::kCuda}) {
    std::set<std::string> names;
    std::set<std::string> ops_per_shape_dtype;
    for (const KernelCase& c : PerfCases(d)) {
      const std::string name = c.Name();
      EXPECT_TRUE(names.insert(name).second) << "duplicate " << name;
      const std::vector<std::string> parts = absl::StrSplit(name, ':');
      ASSERT_GE(parts.size(), 3u) << name;
      EXPECT_EQ(parts[0], KernelOpName(c.op));
      EXPECT_EQ(parts[1], c.shape.name);
      EXPECT_EQ(parts[2], DTypeName(c.dtype));
      if (c.op == KernelOp::kCopy) {
        EXPECT_EQ(parts.size(), 3u) << name;
      } else {
        ASSERT_EQ(parts.size(), 4u) << name;
        if (c.op == KernelOp::kRotate) {
          EXPECT_GE(c.block, 2) << name;
          EXPECT_EQ(parts[3], "r" + std::to_string(c.block)) << name;
        } else {
          EXPECT_EQ(parts[3], c.bits == 0 ? "b3-5" : "b" + std::to_string(c.bits)) << name;
        }
      }
      ops_per_shape_dtype.insert(c.shape.name + DTypeName(c.dtype) + KernelOpName(c.op));
    }
    // Every (shape, dtype) the table names is timed with every op, the copy included.
    size_t pairs = 0;
    for (const auto& [s, dtypes] : PerfShapes(d)) pairs += dtypes.size();
    EXPECT_EQ(ops_per_shape_dtype.size(), pairs * 7);
  }
}

TEST(OpTable, BytesFollowTheOp) {
  KernelCase c;
  c.shape = {"nc_8x4", {8, 4}, Granularity::kChannel, 1};
  c.dtype = DType::kBFloat16;
  c.op = KernelOp::kCopy;
  EXPECT_DOUBLE_EQ(c.Bytes(), 2 * 32 * 2);
  c.op = KernelOp::kLsq;
  EXPECT_DOUBLE_EQ(c.Bytes(), 5 * 32 * 2);
  c.op = KernelOp::kPack;
  c.bits = 4;
  EXPECT_DOUBLE_EQ(c.Bytes(), 32 * 2 + 16);
  c.op = KernelOp::kUnpack;
  c.bits = 0;  // mixed 3..5: 4 bits on average
  EXPECT_DOUBLE_EQ(c.Bytes(), 32 * 2 + 16);
  c.op = KernelOp::kRotate;  // read and write every element, as a copy
  c.block = 4;
  EXPECT_DOUBLE_EQ(c.Bytes(), 2 * 32 * 2);
  EXPECT_EQ(c.Name(), "rotate:nc_8x4:bfloat16:r4");
}

TEST(OpTable, MixedBitsAreSeededAndInRange) {
  KernelCase c;
  c.bits = 0;
  const std::vector<uint8_t> a = c.MixedBits(4096), b = c.MixedBits(4096);
  EXPECT_EQ(a, b);
  std::set<int> seen;
  for (const uint8_t v : a) {
    EXPECT_GE(v, c.mixed_lo);
    EXPECT_LE(v, c.mixed_hi);
    seen.insert(v);
  }
  EXPECT_EQ(seen.size(), 3u);
  c.bits = 4;
  EXPECT_TRUE(c.MixedBits(16).empty());
}

}  // namespace
}  // namespace splitq::kernels
