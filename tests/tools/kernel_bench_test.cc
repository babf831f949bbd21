// tools/kernel_bench.h on the CPU: it times the op table's cases that the filter selects and
// writes each with the fields scripts/kernel-anchors.py joins on. Speeds are printed by
// `splitq bench kernels`, never asserted.
#include "tools/kernel_bench.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>

#include "kernels/op_table.h"

namespace splitq::tools {
namespace {

std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(KernelBench, TimesTheFilteredCasesAndWritesThemAsJson) {
  const std::string json =
      ::testing::TempDir() + "kernel_bench_" + std::to_string(getpid()) + ".json";
  KernelBenchOptions options;
  options.device = "cpu";
  options.filter = "nchw_";
  options.iters = 1;
  options.json_path = json;
  ASSERT_EQ(RunKernelBench(options), 0);
  const std::string doc = ReadAll(json);
  int selected = 0;
  for (const kernels::KernelCase& c : kernels::PerfCases(kernels::Device::kCpu)) {
    const std::string name = c.Name();
    if (name.find("nchw_") == std::string::npos) {
      EXPECT_EQ(doc.find("\"" + name + "\""), std::string::npos) << name << " was not asked for";
      continue;
    }
    ++selected;
    EXPECT_NE(doc.find("\"name\": \"" + name + "\", \"op\": \"" + kernels::KernelOpName(c.op) +
                       "\", \"shape_name\": \"" + c.shape.name + "\""),
              std::string::npos)
        << name << " missing from " << doc;
  }
  EXPECT_GT(selected, 0);
  EXPECT_NE(doc.find("\"pct_of_copy\": "), std::string::npos);
  EXPECT_NE(doc.find("\"pct_of_rw_bound\": "), std::string::npos);
  unlink(json.c_str());
}

TEST(KernelBench, RefusesAFilterThatMatchesNothing) {
  KernelBenchOptions options;
  options.device = "cpu";
  options.filter = "no-such-case";
  options.iters = 1;
  EXPECT_EQ(RunKernelBench(options), 2);
}

}  // namespace
}  // namespace splitq::tools
