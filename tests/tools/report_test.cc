// tools/report.h: the flat JSON reader, reading run directories (bad lines refused with file
// and line, a last line cut short skipped), and the page: every chart present, carrying the
// runs' numbers, fetching nothing.
#include "tools/report.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "base/files.h"
#include "tests/tools/png.h"

namespace splitq::tools {
namespace {

namespace fs = std::filesystem;

TEST(ParseFlatJson, ReadsWhatSplitqWrites) {
  auto r = ParseFlatJson(
      R"({"step": 10, "loss": 2.28674183, "val_bits_per_byte": null, "task": "fmnist",)"
      R"( "ok": true, "neg": -1.5e-3, "q": "a\"b"})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->numbers.at("step"), 10);
  EXPECT_DOUBLE_EQ(r->numbers.at("loss"), 2.28674183);
  EXPECT_DOUBLE_EQ(r->numbers.at("neg"), -1.5e-3);
  EXPECT_EQ(r->numbers.at("ok"), 1);
  EXPECT_EQ(r->numbers.count("val_bits_per_byte"), 0u);  // null: left out
  EXPECT_EQ(r->strings.at("task"), "fmnist");
  EXPECT_EQ(r->strings.at("q"), "a\"b");
  EXPECT_TRUE(ParseFlatJson("{}").ok());
  // summary.json of a client: "lost_steps": [[A, B], ...].
  auto lost = ParseFlatJson(R"({"steps_lost": 3, "lost_steps": [[4, 5], [9, 9]], "e": []})");
  ASSERT_TRUE(lost.ok()) << lost.status();
  EXPECT_EQ(lost->strings.at("lost_steps"), "[[4, 5], [9, 9]]");
  EXPECT_EQ(lost->strings.at("e"), "[]");
  EXPECT_TRUE(ParseFlatJson(" {\n\"a\": 1\n}\n").ok());
}

TEST(ParseFlatJson, RefusesWhatItDoesNotRead) {
  for (const char* bad :
       {"", "[1]", "{\"a\": [1,]}", "{\"a\": [\"x\"]}", "{\"a\" 1}", "{\"a\": }", "{\"a\": 1",
        "{\"a\": {\"b\": 1}}", "{\"a\": 1} x", "{\"a\": nan}", "{a: 1}"}) {
    EXPECT_FALSE(ParseFlatJson(bad).ok()) << bad;
  }
  const auto r = ParseFlatJson("{\"a\": 1,, \"b\": 2}");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(std::string(r.status().message()).find("column 9"), std::string::npos) << r.status();
}

class ReportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() / ("splitq_report_" + std::to_string(getpid()));
    fs::create_directories(root_);
  }
  void TearDown() override { base::RemoveTree(root_.string()); }

  // A run like `splitq train` leaves: metrics every 10 steps, validation every 50.
  std::string MakeRun(const std::string& name, double act_bits, bool summary,
                      bool budgets_per_step = false) {
    const fs::path dir = root_ / name;
    fs::create_directories(dir);
    std::ofstream m(dir / "metrics.jsonl");
    for (int step = 10; step <= 100; step += 10) {
      m << "{\"step\": " << step << ", \"loss\": " << 3.0 - step / 100.0
        << ", \"act_bits\": " << act_bits
        << ", \"grad_bits\": 6.0, \"wire_bits_up\": " << act_bits + 0.25
        << ", \"wire_bits_down\": 6.5, \"code_entropy_bits_up\": " << act_bits - 0.5
        << ", \"step_ms\": 12.5";
      if (budgets_per_step) {
        // A newer run: the step's phases too (their mean: 2 + 1 + 8 + 0.5 + 1 = 12.5 ms).
        m << ", \"client_forward_ms\": " << (step <= 50 ? 1.5 : 2.5)
          << ", \"encode_ms\": 1, \"server_wire_ms\": 8, \"decode_ms\": 0.5, "
             "\"client_backward_ms\": 1";
        m << ", \"act_budget\": " << 8.0 - step / 25.0 << ", \"grad_budget\": null";
        // 6 channels: the first at 8 bits, the rest falling with the budget.
        const int b = std::max(1, 8 - step / 25);
        m << ", \"act_bit_map\": \"8" << std::string(5, static_cast<char>('0' + b)) << "\"";
      }
      m << "}\n";
    }
    std::ofstream v(dir / "validation.jsonl");
    v << "{\"step\": 50, \"val_loss\": 0.5, \"val_accuracy\": 0.8125, \"val_bits_per_byte\": "
         "null}\n{\"step\": 100, \"val_loss\": 0.4, \"val_accuracy\": 0.875, "
         "\"val_bits_per_byte\": null}\n";
    if (summary) {
      std::ofstream s(dir / "summary.json");
      s << "{\n  \"task\": \"fmnist\",\n  \"steps\": 100,\n  \"act_budget\": " << act_bits
        << ",\n  \"grad_budget\": 6.0,\n  \"bytes_up\": 1000000,\n  \"bytes_down\": 3000000,\n"
           "  \"bytes_fp32_equivalent\": 40000000,\n  \"val_accuracy\": 0.875,\n  \"steps_lost\": "
           "2,\n"
           "  \"lost_steps\": [[4, 5]]\n}\n";
    }
    return dir.string();
  }

  fs::path root_;
};

TEST_F(ReportTest, TwoRunsSideBySide) {
  const std::string a = MakeRun("amaq-4bit", 4.0, true);
  const std::string b = MakeRun("uniform-3bit", 3.0, false);  // still running: no summary
  const std::string out = (root_ / "report.html").string();
  ASSERT_TRUE(WriteReport({a, b}, out).ok());
  std::ifstream in(out);
  const std::string html((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  for (const char* id : {"id=\"loss\"", "id=\"val_loss\"", "id=\"val_accuracy\"", "id=\"bits\"",
                         "id=\"wire\"", "id=\"step_ms\"", "id=\"summary\""}) {
    EXPECT_NE(html.find(id), std::string::npos) << id;
  }
  // No language-model runs: no bits-per-byte chart.
  EXPECT_EQ(html.find("id=\"val_bits_per_byte\""), std::string::npos);
  // The runs' numbers: the loss at step 100 of the first run, the validation accuracy of the
  // second, the activation bits of both, the first run's budget and bytes against fp32.
  EXPECT_NE(html.find("data-label=\"amaq-4bit\" data-points=\"10,2.9 20,2.8"), std::string::npos);
  EXPECT_NE(html.find("uniform-3bit, step 100: 0.875"), std::string::npos);
  EXPECT_NE(html.find("data-label=\"amaq-4bit: activations\" data-points=\"10,4 "),
            std::string::npos);
  EXPECT_NE(html.find("data-label=\"uniform-3bit: activations\" data-points=\"10,3 "),
            std::string::npos);
  EXPECT_NE(html.find("data-label=\"amaq-4bit: activation budget (final)\" data-y=\"4\""),
            std::string::npos);
  EXPECT_NE(html.find("amaq-4bit: 4 MB on the wire up and down against 40 MB as fp32 (10%)"),
            std::string::npos);
  EXPECT_NE(html.find("<td>lost_steps</td><td>[[4, 5]]</td><td>-</td>"), std::string::npos);
  // Self-contained: no scripts, no fetches (the SVG namespace is the one URL).
  EXPECT_EQ(html.find("<script"), std::string::npos);
  EXPECT_EQ(html.find("src="), std::string::npos);
  EXPECT_EQ(html.find("href="), std::string::npos);
}

// The step-time breakdown: one stacked bar per run that logged the phases, each phase's mean
// over the run's lines; a run from before the phases is named as such.
TEST_F(ReportTest, StepTimeBreakdown) {
  const std::string newer = MakeRun("newer", 4.0, true, /*budgets_per_step=*/true);
  const std::string older = MakeRun("older", 4.0, true);
  const std::string out = (root_ / "report.html").string();
  ASSERT_TRUE(WriteReport({newer, older}, out).ok());
  std::ifstream in(out);
  const std::string html((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(html.find("id=\"step_breakdown\""), std::string::npos);
  for (const char* bar :
       {"data-phase=\"client_forward_ms\" data-ms=\"2\"", "data-phase=\"encode_ms\" data-ms=\"1\"",
        "data-phase=\"server_wire_ms\" data-ms=\"8\"", "data-phase=\"decode_ms\" data-ms=\"0.5\"",
        "data-phase=\"client_backward_ms\" data-ms=\"1\""}) {
    EXPECT_NE(html.find(bar), std::string::npos) << bar;
  }
  EXPECT_NE(html.find("<td>newer</td><td>2</td><td>1</td><td>8</td><td>0.5</td><td>1</td>"
                      "<td>12.5</td>"),
            std::string::npos);
  EXPECT_NE(html.find("No breakdown logged by: older"), std::string::npos);
}

// Metrics lines with the budget of each window: plotted over steps instead of the final
// budget's horizontal line; a null budget (fp32 gradients) plots nothing.
TEST_F(ReportTest, BudgetsOverSteps) {
  const std::string a = MakeRun("scheduled", 4.0, true, true);
  const std::string out = (root_ / "budgets.html").string();
  ASSERT_TRUE(WriteReport({a}, out).ok());
  std::ifstream in(out);
  const std::string html((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(html.find("data-label=\"scheduled: activation budget\" data-points=\"10,7.6 20,7.2 "),
            std::string::npos);
  EXPECT_EQ(html.find("scheduled: gradient budget"), std::string::npos);
  EXPECT_EQ(html.find("budget (final)"), std::string::npos);
  // The bit map: 10 columns x 6 channels, ending with the last line's map.
  EXPECT_NE(html.find("id=\"bit_map_0\""), std::string::npos);
  EXPECT_NE(html.find("data-channels=\"6\" data-columns=\"10\" data-first-step=\"10\" "
                      "data-last-step=\"100\" data-last-map=\"844444\""),
            std::string::npos);
  size_t rects = 0;
  const std::string cell = "<rect class=\"cell\"";
  for (size_t at = html.find(cell); at != std::string::npos; at = html.find(cell, at + 1)) {
    ++rects;
  }
  EXPECT_EQ(rects, 60u);
}

TEST_F(ReportTest, BadInputIsNamed) {
  EXPECT_EQ(ReadRun((root_ / "nothing").string()).status().code(), absl::StatusCode::kNotFound);
  const std::string a = MakeRun("broken", 4.0, false);
  {
    std::ofstream m(fs::path(a) / "metrics.jsonl", std::ios::app);
    m << "{\"step\": 110, \"loss\": oops}\n{\"step\": 120, \"loss\": 1.0}\n";
  }
  const auto run = ReadRun(a);
  ASSERT_FALSE(run.ok());
  EXPECT_NE(std::string(run.status().message()).find("metrics.jsonl:11:"), std::string::npos)
      << run.status();
  // The report is not written when a run is bad.
  const std::string out = (root_ / "bad.html").string();
  EXPECT_FALSE(WriteReport({a}, out).ok());
  EXPECT_FALSE(fs::exists(out));
}

TEST_F(ReportTest, ALastLineCutShortIsSkipped) {
  const std::string a = MakeRun("running", 4.0, false);
  {
    std::ofstream m(fs::path(a) / "metrics.jsonl", std::ios::app);
    m << "{\"step\": 110, \"lo";  // the writer is mid-line
  }
  const auto run = ReadRun(a);
  ASSERT_TRUE(run.ok()) << run.status();
  EXPECT_EQ(run->metrics.size(), 10u);
  EXPECT_FALSE(run->has_summary);
}

// Headless Chromium, the way a user opens the file. Chromium is Debian's `chromium` (a test
// dependency in scripts/deps.list, or SPLITQ_CHROMIUM=PATH); without it the test skips with the
// reason, unless SPLITQ_REQUIRE_CHROMIUM=1 (.ci/run sets it).
std::string FindChromium() {
  if (const char* env = std::getenv("SPLITQ_CHROMIUM"); env != nullptr && *env != 0) return env;
  for (const char* path : {"/usr/bin/chromium", "/usr/bin/chromium-browser",
                           "/usr/local/bin/chromium", "/usr/local/bin/chromium-browser"}) {
    if (access(path, X_OK) == 0) return path;
  }
  return "";
}

struct BrowserRun {
  int rc = -1;
  std::string dom;                   // --dump-dom: the page's DOM after Chromium parsed it
  std::vector<std::string> console;  // every console message the page caused
};

// Loads `page` once with --dump-dom and, if `screenshot` is set, once more with --screenshot
// (1280 x 5000 px: the whole page of one run). Network names resolve nowhere, so a fetch would
// fail and show up as a console message.
BrowserRun OpenInChromium(const std::string& chromium, const fs::path& page, const fs::path& work,
                          const std::string& screenshot = "") {
  BrowserRun run;
  const std::string common = "timeout 120 '" + chromium +
                             "' --headless --no-sandbox --disable-gpu --disable-dev-shm-usage "
                             "--no-first-run --enable-logging=stderr --v=0 "
                             "--host-resolver-rules='MAP * ~NOTFOUND' --user-data-dir='" +
                             (work / "profile").string() + "' ";
  const std::string url = "'file://" + page.string() + "'";
  const fs::path out = work / "chromium.out", err = work / "chromium.err";
  std::string cmd =
      common + "--dump-dom " + url + " >'" + out.string() + "' 2>'" + err.string() + "'";
  int status = std::system(cmd.c_str());
  if (!screenshot.empty() && status == 0) {
    cmd = common + "--window-size=1280,5000 --screenshot='" + screenshot + "' " + url +
          " >/dev/null 2>>'" + err.string() + "'";
    status = std::system(cmd.c_str());
  }
  run.rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128;
  std::ifstream d(out), e(err);
  run.dom.assign(std::istreambuf_iterator<char>(d), std::istreambuf_iterator<char>());
  for (std::string line; std::getline(e, line);) {
    if (line.find(":CONSOLE") != std::string::npos) run.console.push_back(line);
  }
  return run;
}

size_t PixelsOf(const splitq::testing::Image& image, uint8_t r, uint8_t g, uint8_t b) {
  return static_cast<size_t>(
      std::count(image.rgb.begin(), image.rgb.end(), std::array<uint8_t, 3>{r, g, b}));
}

// The report in a real browser: it loads with no console message at all (it has no scripts and
// fetches nothing, so any message is a fault: a blocked fetch, a parse error); Chromium's DOM
// holds every chart with the run's numbers; and the screenshot shows the charts: the bit map's
// 8-bit cells (#fde725) and the step-time bar's "server and wire" segment (#7f7f7f) cover
// thousands of pixels, where a report of a run without them has no more than their legends'
// swatches. A control page proves that console messages are seen.
TEST_F(ReportTest, OpensInChromium) {
  const std::string chromium = FindChromium();
  if (chromium.empty()) {
    const char* require = std::getenv("SPLITQ_REQUIRE_CHROMIUM");
    if (require != nullptr && std::string(require) == "1") {
      FAIL() << "SPLITQ_REQUIRE_CHROMIUM=1 but no chromium (install Debian's `chromium`, or set "
                "SPLITQ_CHROMIUM)";
    }
    GTEST_SKIP() << "no chromium: install Debian's `chromium` (scripts/install-deps.sh does) or "
                    "set SPLITQ_CHROMIUM";
  }
  const fs::path control = root_ / "control.html";
  std::ofstream(control) << "<html><body><p>control</p><script>console.error(\"splitq-control\");"
                            "</script></body></html>";
  const BrowserRun c = OpenInChromium(chromium, control, root_);
  ASSERT_EQ(c.rc, 0) << "chromium failed on a control page";
  ASSERT_EQ(c.console.size(), 1u) << "the control page's console.error was not seen";
  EXPECT_NE(c.console[0].find("splitq-control"), std::string::npos) << c.console[0];

  const std::string newer = MakeRun("newer", 4.0, true, /*budgets_per_step=*/true);
  const fs::path page = root_ / "report.html";
  ASSERT_TRUE(WriteReport({newer}, page.string()).ok());
  const std::string shot = (root_ / "report.png").string();
  const BrowserRun r = OpenInChromium(chromium, page, root_, shot);
  ASSERT_EQ(r.rc, 0);
  std::ostringstream messages;
  for (const std::string& m : r.console) messages << m << "\n";
  EXPECT_TRUE(r.console.empty()) << messages.str();
  for (const char* id :
       {"id=\"loss\"", "id=\"val_loss\"", "id=\"val_accuracy\"", "id=\"bits\"", "id=\"wire\"",
        "id=\"bit_map_0\"", "id=\"step_breakdown\"", "id=\"summary\""}) {
    EXPECT_NE(r.dom.find(id), std::string::npos) << id;
  }
  EXPECT_NE(r.dom.find("data-label=\"newer\" data-points=\"10,2.9 20,2.8"), std::string::npos);
  EXPECT_NE(r.dom.find("data-phase=\"server_wire_ms\" data-ms=\"8\""), std::string::npos);
  EXPECT_NE(r.dom.find("data-last-map=\"844444\""), std::string::npos);
  auto image = splitq::testing::ReadPng(shot);
  ASSERT_TRUE(image.ok()) << image.status();
  EXPECT_EQ(image->width, 1280);
  const size_t eight_bits = PixelsOf(*image, 0xfd, 0xe7, 0x25);
  const size_t wire = PixelsOf(*image, 0x7f, 0x7f, 0x7f);
  EXPECT_GE(eight_bits, 2000u) << "the bit map's 8-bit row is not on the screenshot";
  EXPECT_GE(wire, 2000u) << "the step-time bar is not on the screenshot";

  // The same measures on a report without a bit map or a breakdown stay near zero.
  const std::string older = MakeRun("older", 4.0, true);
  const fs::path bare = root_ / "bare.html";
  ASSERT_TRUE(WriteReport({older}, bare.string()).ok());
  const std::string bare_shot = (root_ / "bare.png").string();
  ASSERT_EQ(OpenInChromium(chromium, bare, root_, bare_shot).rc, 0);
  auto bare_image = splitq::testing::ReadPng(bare_shot);
  ASSERT_TRUE(bare_image.ok()) << bare_image.status();
  EXPECT_LT(PixelsOf(*bare_image, 0xfd, 0xe7, 0x25), 500u);
  EXPECT_LT(PixelsOf(*bare_image, 0x7f, 0x7f, 0x7f), 500u);
  std::cout << "chromium: " << r.dom.size() << " bytes of DOM, screenshot " << image->width << "x"
            << image->height << ": " << eight_bits << " px of 8-bit cells, " << wire
            << " px of the wire segment (a run without them: "
            << PixelsOf(*bare_image, 0xfd, 0xe7, 0x25) << ", "
            << PixelsOf(*bare_image, 0x7f, 0x7f, 0x7f) << ")\n";
}

}  // namespace
}  // namespace splitq::tools
