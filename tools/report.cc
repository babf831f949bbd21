#include "tools/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "base/files.h"
#include "base/status_macros.h"

namespace splitq::tools {
namespace {

class Reader {
 public:
  explicit Reader(const std::string& text) : s_(text) {}
  void SkipSpace() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\r' || s_[i_] == '\n'))
      ++i_;
  }
  bool Eat(char c) {
    SkipSpace();
    if (i_ < s_.size() && s_[i_] == c) {
      ++i_;
      return true;
    }
    return false;
  }
  bool Word(const char* w) {
    SkipSpace();
    const size_t n = std::char_traits<char>::length(w);
    if (s_.compare(i_, n, w) != 0) return false;
    i_ += n;
    return true;
  }
  bool String(std::string* out) {
    if (!Eat('"')) return false;
    out->clear();
    while (i_ < s_.size() && s_[i_] != '"') {
      if (s_[i_] == '\\') {
        if (i_ + 1 >= s_.size() || (s_[i_ + 1] != '"' && s_[i_ + 1] != '\\')) return false;
        ++i_;
      }
      out->push_back(s_[i_++]);
    }
    if (i_ >= s_.size()) return false;
    ++i_;
    return true;
  }
  bool Number(double* out) {
    SkipSpace();
    if (i_ >= s_.size()) return false;
    const char* begin = s_.c_str() + i_;
    char* end = nullptr;
    *out = std::strtod(begin, &end);
    if (end == begin || !std::isfinite(*out)) return false;
    i_ += static_cast<size_t>(end - begin);
    return true;
  }
  // An array of numbers or of such arrays (e.g. summary.json's "lost_steps": [[A, B], ...]),
  // returned as its text.
  bool Array(std::string* out, int depth = 0) {
    SkipSpace();
    const size_t start = i_;
    if (depth > 4 || !Eat('[')) return false;
    if (!Eat(']')) {
      while (true) {
        double number = 0;
        std::string inner;
        SkipSpace();
        if (!(i_ < s_.size() && s_[i_] == '[' ? Array(&inner, depth + 1) : Number(&number))) {
          return false;
        }
        if (Eat(',')) continue;
        if (Eat(']')) break;
        return false;
      }
    }
    *out = s_.substr(start, i_ - start);
    return true;
  }
  bool AtEnd() {
    SkipSpace();
    return i_ == s_.size();
  }
  size_t pos() const { return i_; }

 private:
  const std::string& s_;
  size_t i_ = 0;
};

absl::Status ReadJsonl(const std::filesystem::path& path, std::vector<FlatRecord>* out) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path.string(), ": cannot open"));
  std::vector<std::string> lines;
  std::string line;
  while (std::getline(in, line)) lines.push_back(line);
  for (size_t n = 0; n < lines.size(); ++n) {
    if (lines[n].find_first_not_of(" \t\r") == std::string::npos) continue;
    auto record = ParseFlatJson(lines[n]);
    if (!record.ok()) {
      if (n + 1 == lines.size()) break;  // the last line, still being written
      return absl::InvalidArgumentError(
          absl::StrCat(path.string(), ":", n + 1, ": ", record.status().message()));
    }
    out->push_back(std::move(*record));
  }
  return absl::OkStatus();
}

// ---- rendering ----------------------------------------------------------------------------

const char* const kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd",
                               "#ff7f0e", "#17becf", "#8c564b", "#e377c2"};

std::string Escape(const std::string& s) {
  std::string out;
  for (const char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      default:
        out.push_back(c);
    }
  }
  return out;
}

std::string Num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

constexpr char kDashed[] = "6 3";
constexpr char kDotted[] = "2 3";

struct Series {
  std::string label;  // "run: key"
  std::string color;
  std::string dash;  // SVG stroke-dasharray; empty: solid
  std::vector<std::pair<double, double>> points;
};

struct HLine {  // a horizontal reference (a budget)
  std::string label, color;
  double y;
};

// Up to 6 round tick values covering [lo, hi].
std::vector<double> Ticks(double lo, double hi) {
  const double span = hi - lo;
  const double raw = span / 5;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (const double f : {1.0, 2.0, 5.0, 10.0}) {
    step = f * mag;
    if (span / step <= 6) break;
  }
  std::vector<double> ticks;
  for (double t = std::ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) {
    ticks.push_back(std::abs(t) < step * 1e-9 ? 0.0 : t);
  }
  return ticks;
}

std::string Chart(const std::string& id, const std::string& title, const std::string& y_label,
                  const std::vector<Series>& series, const std::vector<HLine>& lines) {
  constexpr double kW = 720, kH = 300, kLeft = 64, kRight = 16, kTop = 28, kBottom = 40;
  double x0 = HUGE_VAL, x1 = -HUGE_VAL, y0 = HUGE_VAL, y1 = -HUGE_VAL;
  for (const Series& s : series) {
    for (const auto& [x, y] : s.points) {
      x0 = std::min(x0, x);
      x1 = std::max(x1, x);
      y0 = std::min(y0, y);
      y1 = std::max(y1, y);
    }
  }
  for (const HLine& l : lines) {
    y0 = std::min(y0, l.y);
    y1 = std::max(y1, l.y);
  }
  std::ostringstream o;
  o << "<section class=\"chart\" id=\"" << id << "\"><h2>" << Escape(title) << "</h2>\n";
  if (!(x0 <= x1) || !(y0 <= y1)) {
    o << "<p class=\"empty\">no data in these runs</p></section>\n";
    return o.str();
  }
  x0 = std::min(x0, 0.0);  // steps from 0 (a run validated once still gets an axis)
  if (x1 == x0) x1 = x0 + 1;
  if (y1 == y0) {
    y0 -= 0.5;
    y1 += 0.5;
  }
  const double pad = (y1 - y0) * 0.05;
  y0 -= pad;
  y1 += pad;
  const auto px = [&](double x) { return kLeft + (x - x0) / (x1 - x0) * (kW - kLeft - kRight); };
  const auto py = [&](double y) { return kTop + (y1 - y) / (y1 - y0) * (kH - kTop - kBottom); };
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << kW << "\" height=\"" << kH
    << "\" viewBox=\"0 0 " << kW << " " << kH << "\">\n";
  o << "<rect x=\"" << kLeft << "\" y=\"" << kTop << "\" width=\"" << kW - kLeft - kRight
    << "\" height=\"" << kH - kTop - kBottom << "\" fill=\"#fff\" stroke=\"#999\"/>\n";
  for (const double t : Ticks(y0, y1)) {
    o << "<line x1=\"" << kLeft << "\" x2=\"" << kW - kRight << "\" y1=\"" << Num(py(t))
      << "\" y2=\"" << Num(py(t)) << "\" stroke=\"#eee\"/><text class=\"tick\" x=\"" << kLeft - 4
      << "\" y=\"" << Num(py(t) + 4) << "\" text-anchor=\"end\">" << Num(t) << "</text>\n";
  }
  for (const double t : Ticks(x0, x1)) {
    o << "<text class=\"tick\" x=\"" << Num(px(t)) << "\" y=\"" << kH - kBottom + 16
      << "\" text-anchor=\"middle\">" << Num(t) << "</text>\n";
  }
  o << "<text class=\"axis\" x=\"" << (kW + kLeft) / 2 << "\" y=\"" << kH - 6
    << "\" text-anchor=\"middle\">step</text><text class=\"axis\" x=\"8\" y=\"" << kTop - 10
    << "\">" << Escape(y_label) << "</text>\n";  // above the plot, clear of the top tick
  for (const HLine& l : lines) {
    o << "<line class=\"budget\" data-label=\"" << Escape(l.label) << "\" data-y=\"" << Num(l.y)
      << "\" x1=\"" << kLeft << "\" x2=\"" << kW - kRight << "\" y1=\"" << Num(py(l.y))
      << "\" y2=\"" << Num(py(l.y)) << "\" stroke=\"" << l.color
      << "\" stroke-dasharray=\"2 4\"><title>" << Escape(l.label) << " " << Num(l.y)
      << "</title></line>\n";
  }
  for (const Series& s : series) {
    std::string pts, data;
    for (const auto& [x, y] : s.points) {
      absl::StrAppend(&pts, Num(px(x)), ",", Num(py(y)), " ");
      absl::StrAppend(&data, Num(x), ",", Num(y), " ");
    }
    o << "<polyline class=\"series\" data-label=\"" << Escape(s.label) << "\" data-points=\""
      << data << "\" points=\"" << pts << "\" fill=\"none\" stroke=\"" << s.color
      << "\" stroke-width=\"1.5\"" << (s.dash.empty() ? "" : " stroke-dasharray=\"" + s.dash + "\"")
      << "><title>" << Escape(s.label) << "</title></polyline>\n";
    if (s.points.size() <= 400) {  // hover values, while the file stays small
      for (const auto& [x, y] : s.points) {
        o << "<circle cx=\"" << Num(px(x)) << "\" cy=\"" << Num(py(y)) << "\" r=\"2\" fill=\""
          << s.color << "\"><title>" << Escape(s.label) << ", step " << Num(x) << ": " << Num(y)
          << "</title></circle>";
      }
      o << "\n";
    }
  }
  o << "</svg>\n<div class=\"legend\">";
  for (const Series& s : series) {
    o << "<span style=\"color:" << s.color << "\">"
      << (s.dash.empty()      ? "&#9472;&#9472; "
          : s.dash == kDotted ? "&#183;&#183;&#183; "
                              : "- - ")
      << Escape(s.label) << "</span> ";
  }
  for (const HLine& l : lines) {
    o << "<span style=\"color:" << l.color << "\">&#183;&#183;&#183; " << Escape(l.label) << " "
      << Num(l.y) << "</span> ";
  }
  o << "</div></section>\n";
  return o.str();
}

// The series of `key` over "step" in each run's records (`validation` or `metrics`).
std::vector<Series> Collect(const std::vector<RunData>& runs, bool validation,
                            const std::string& key, const std::string& dash,
                            const std::string& suffix) {
  std::vector<Series> out;
  for (size_t r = 0; r < runs.size(); ++r) {
    Series s;
    s.label = runs[r].name + suffix;
    s.color = kColors[r % (sizeof kColors / sizeof kColors[0])];
    s.dash = dash;
    for (const FlatRecord& rec : validation ? runs[r].validation : runs[r].metrics) {
      const auto step = rec.numbers.find("step");
      const auto v = rec.numbers.find(key);
      if (step != rec.numbers.end() && v != rec.numbers.end()) {
        s.points.emplace_back(step->second, v->second);
      }
    }
    if (!s.points.empty()) out.push_back(std::move(s));
  }
  return out;
}

void Append(std::vector<Series>* a, std::vector<Series> b) {
  for (Series& s : b) a->push_back(std::move(s));
}

// Bits 1..8 (viridis-like, dark to light).
const char* const kBitColors[] = {"#440154", "#46327e", "#365c8d", "#277f8e",
                                  "#1fa187", "#4ac16d", "#a0da39", "#fde725"};

// A run's activation bits per channel over steps (metrics.jsonl's "act_bit_map"): one column
// per logged line, one row per channel, at most 300 columns (every k-th line) and 128 rows
// (a row the mean of consecutive channels). Empty when the run logged no map.
std::string BitMap(const RunData& run, size_t index) {
  std::vector<std::pair<double, const std::string*>> cols;
  size_t channels = 0;
  for (const FlatRecord& rec : run.metrics) {
    const auto map = rec.strings.find("act_bit_map");
    const auto step = rec.numbers.find("step");
    if (map == rec.strings.end() || step == rec.numbers.end() || map->second.empty()) continue;
    cols.emplace_back(step->second, &map->second);
    channels = std::max(channels, map->second.size());
  }
  if (cols.empty()) return "";
  constexpr size_t kMaxCols = 300, kMaxRows = 128;
  const size_t col_stride = (cols.size() + kMaxCols - 1) / kMaxCols;
  const size_t row_group = (channels + kMaxRows - 1) / kMaxRows;
  const size_t ncols = (cols.size() + col_stride - 1) / col_stride;
  const size_t nrows = (channels + row_group - 1) / row_group;
  constexpr double kLeft = 64, kTop = 8, kPlotW = 640;
  const double cell_w = kPlotW / static_cast<double>(ncols);
  const double cell_h = std::max(1.0, std::min(8.0, 384.0 / static_cast<double>(nrows)));
  const double height = kTop + cell_h * static_cast<double>(nrows) + 36;
  std::ostringstream o;
  o << "<section class=\"chart\" id=\"bit_map_" << index
    << "\"><h2>Activation bits per channel over steps: " << Escape(run.name)
    << "</h2>\n<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"bitmap\" width=\""
    << kLeft + kPlotW + 16 << "\" height=\"" << Num(height) << "\" data-channels=\"" << channels
    << "\" data-columns=\"" << ncols << "\" data-first-step=\"" << Num(cols.front().first)
    << "\" data-last-step=\"" << Num(cols.back().first) << "\" data-last-map=\""
    << Escape(*cols.back().second) << "\">\n";
  for (size_t c = 0; c < ncols; ++c) {
    const std::string& map = *cols[c * col_stride].second;
    for (size_t r = 0; r < nrows; ++r) {
      double sum = 0;
      int n = 0;
      for (size_t ch = r * row_group; ch < std::min(channels, (r + 1) * row_group); ++ch) {
        if (ch < map.size() && map[ch] >= '1' && map[ch] <= '8') {
          sum += map[ch] - '0';
          ++n;
        }
      }
      if (n == 0) continue;
      const int bits = std::clamp(static_cast<int>(std::lround(sum / n)), 1, 8);
      o << "<rect class=\"cell\" x=\"" << Num(kLeft + cell_w * static_cast<double>(c)) << "\" y=\""
        << Num(kTop + cell_h * static_cast<double>(r)) << "\" width=\"" << Num(cell_w + 0.05)
        << "\" height=\"" << Num(cell_h + 0.05) << "\" fill=\"" << kBitColors[bits - 1] << "\"/>";
    }
    o << "\n";
  }
  const double bottom = kTop + cell_h * static_cast<double>(nrows);
  o << "<text class=\"axis\" x=\"4\" y=\"" << Num(kTop + 10) << "\">channel 0</text>"
    << "<text class=\"axis\" x=\"4\" y=\"" << Num(bottom) << "\">" << channels - 1 << "</text>"
    << "<text class=\"tick\" x=\"" << kLeft << "\" y=\"" << Num(bottom + 14) << "\">step "
    << Num(cols.front().first) << "</text><text class=\"tick\" x=\"" << kLeft + kPlotW << "\" y=\""
    << Num(bottom + 14) << "\" text-anchor=\"end\">step " << Num(cols.back().first)
    << "</text>\n</svg>\n<div class=\"legend\">bits: ";
  for (int b = 1; b <= 8; ++b) {
    o << "<span style=\"background:" << kBitColors[b - 1] << ";color:" << (b >= 6 ? "#000" : "#fff")
      << ";padding:0 6px\">" << b << "</span>";
  }
  if (row_group > 1) o << " (a row: the mean of " << row_group << " channels)";
  if (col_stride > 1) o << " (a column: every " << col_stride << "th metrics line)";
  o << "</div></section>\n";
  return o.str();
}

std::string SummaryTable(const std::vector<RunData>& runs) {
  std::set<std::string> keys;
  for (const RunData& r : runs) {
    for (const auto& [k, v] : r.summary.numbers) keys.insert(k);
    for (const auto& [k, v] : r.summary.strings) keys.insert(k);
  }
  std::ostringstream o;
  o << "<section id=\"summary\"><h2>Summaries (summary.json)</h2>\n";
  if (keys.empty()) {
    o << "<p class=\"empty\">no summary.json yet</p></section>\n";
    return o.str();
  }
  o << "<table><tr><th>key</th>";
  for (const RunData& r : runs) o << "<th>" << Escape(r.name) << "</th>";
  o << "</tr>\n";
  for (const std::string& k : keys) {
    o << "<tr><td>" << Escape(k) << "</td>";
    for (const RunData& r : runs) {
      const auto n = r.summary.numbers.find(k);
      const auto s = r.summary.strings.find(k);
      o << "<td>"
        << (n != r.summary.numbers.end()   ? Num(n->second)
            : s != r.summary.strings.end() ? Escape(s->second)
                                           : std::string("-"))
        << "</td>";
    }
    o << "</tr>\n";
  }
  o << "</table>\n";
  // Bytes against fp32, per run.
  for (const RunData& r : runs) {
    const auto& n = r.summary.numbers;
    const auto up = n.find("bytes_up"), down = n.find("bytes_down"),
               fp32 = n.find("bytes_fp32_equivalent");
    if (up != n.end() && down != n.end() && fp32 != n.end() && fp32->second > 0) {
      o << "<p class=\"bytes\">" << Escape(r.name) << ": " << Num((up->second + down->second) / 1e6)
        << " MB on the wire up and down against " << Num(fp32->second / 1e6) << " MB as fp32 ("
        << Num(100.0 * (up->second + down->second) / fp32->second) << "%)</p>\n";
    }
  }
  o << "</section>\n";
  return o.str();
}

}  // namespace

absl::StatusOr<FlatRecord> ParseFlatJson(const std::string& text) {
  Reader in(text);
  FlatRecord rec;
  const auto bad = [&](const char* what) {
    return absl::InvalidArgumentError(absl::StrCat(what, " at column ", in.pos() + 1));
  };
  if (!in.Eat('{')) return bad("expected '{'");
  if (!in.Eat('}')) {
    while (true) {
      std::string key;
      if (!in.String(&key)) return bad("expected a key string");
      if (!in.Eat(':')) return bad("expected ':'");
      std::string str;
      double number = 0;
      in.SkipSpace();
      if (in.Word("null")) {
      } else if (in.Word("true")) {
        rec.numbers[key] = 1;
      } else if (in.Word("false")) {
        rec.numbers[key] = 0;
      } else if (in.String(&str) || in.Array(&str)) {
        rec.strings[key] = str;
      } else if (in.Number(&number)) {
        rec.numbers[key] = number;
      } else {
        return bad("expected a number, string, array of numbers, true, false or null");
      }
      if (in.Eat(',')) continue;
      if (in.Eat('}')) break;
      return bad("expected ',' or '}'");
    }
  }
  if (!in.AtEnd()) return bad("text after the object");
  return rec;
}

absl::StatusOr<RunData> ReadRun(const std::string& dir) {
  namespace fs = std::filesystem;
  const fs::path root(dir);
  RunData run;
  run.name = root.filename().string();
  if (run.name.empty() || run.name == ".") run.name = root.parent_path().filename().string();
  if (run.name.empty()) run.name = dir;
  std::error_code ec;
  const bool has_metrics = fs::exists(root / "metrics.jsonl", ec);
  const bool has_validation = fs::exists(root / "validation.jsonl", ec);
  if (!has_metrics && !has_validation) {
    return absl::NotFoundError(
        absl::StrCat(dir, ": no metrics.jsonl or validation.jsonl (not a run's --out directory?)"));
  }
  if (has_metrics) SPLITQ_RETURN_IF_ERROR(ReadJsonl(root / "metrics.jsonl", &run.metrics));
  if (has_validation) {
    SPLITQ_RETURN_IF_ERROR(ReadJsonl(root / "validation.jsonl", &run.validation));
  }
  if (fs::exists(root / "summary.json", ec)) {
    std::ifstream in(root / "summary.json");
    std::stringstream text;
    text << in.rdbuf();
    auto summary = ParseFlatJson(text.str());
    if (!summary.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat((root / "summary.json").string(), ": ", summary.status().message()));
    }
    run.summary = std::move(*summary);
    run.has_summary = true;
  }
  return run;
}

// Where a step's time went (metrics.jsonl's client_forward_ms, encode_ms, server_wire_ms,
// decode_ms, client_backward_ms, since 2026-12-07): one stacked bar per run, each phase's
// mean over the run's logged lines, with its milliseconds. Runs that predate the phases are
// listed as such.
std::string StepBreakdown(const std::vector<RunData>& runs) {
  static const std::pair<const char*, const char*> kPhases[] = {
      {"client_forward_ms", "client forward"},
      {"encode_ms", "encode"},
      {"server_wire_ms", "server and wire"},
      {"decode_ms", "decode"},
      {"client_backward_ms", "client backward and update"}};
  static const char* const kPhaseColors[] = {"#1f77b4", "#ff7f0e", "#7f7f7f", "#2ca02c", "#9467bd"};
  struct Row {
    std::string name;
    double ms[5] = {0, 0, 0, 0, 0};
    double total = 0;
  };
  std::vector<Row> rows;
  std::string missing;
  for (const RunData& run : runs) {
    Row row;
    row.name = run.name;
    int lines = 0;
    for (const FlatRecord& rec : run.metrics) {
      if (rec.numbers.count(kPhases[0].first) == 0) continue;
      ++lines;
      for (int k = 0; k < 5; ++k) {
        const auto v = rec.numbers.find(kPhases[k].first);
        if (v != rec.numbers.end()) row.ms[k] += v->second;
      }
    }
    if (lines == 0) {
      absl::StrAppend(&missing, missing.empty() ? "" : ", ", run.name);
      continue;
    }
    for (double& m : row.ms) {
      m /= lines;
      row.total += m;
    }
    rows.push_back(row);
  }
  std::ostringstream o;
  o << "<section id=\"step_breakdown\"><h2>Step time breakdown (mean per logged step)</h2>\n";
  if (!rows.empty()) {
    double widest = 0;
    for (const Row& r : rows) widest = std::max(widest, r.total);
    const double x0 = 160, width = 560, bar = 22, gap = 12;
    const double height = 30 + rows.size() * (bar + gap);
    o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << Num(x0 + width + 80)
      << "\" height=\"" << Num(height) << "\" role=\"img\">\n";
    for (size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      const double y = 10 + i * (bar + gap);
      o << "<text class=\"axis\" x=\"" << Num(x0 - 6) << "\" y=\"" << Num(y + bar * 0.7)
        << "\" text-anchor=\"end\">" << Escape(r.name) << "</text>\n";
      double x = x0;
      for (int k = 0; k < 5; ++k) {
        const double w = widest > 0 ? r.ms[k] / widest * width : 0;
        o << "<rect class=\"phase\" data-phase=\"" << kPhases[k].first << "\" data-ms=\""
          << Num(r.ms[k]) << "\" x=\"" << Num(x) << "\" y=\"" << Num(y) << "\" width=\"" << Num(w)
          << "\" height=\"" << Num(bar) << "\" fill=\"" << kPhaseColors[k] << "\"><title>"
          << Escape(r.name) << ": " << kPhases[k].second << " " << Num(r.ms[k])
          << " ms</title></rect>\n";
        x += w;
      }
      o << "<text class=\"tick\" x=\"" << Num(x + 4) << "\" y=\"" << Num(y + bar * 0.7) << "\">"
        << Num(r.total) << " ms</text>\n";
    }
    o << "</svg>\n<div class=\"legend\">";
    for (int k = 0; k < 5; ++k) {
      o << "<span style=\"color:" << kPhaseColors[k] << "\">&#9632;</span> " << kPhases[k].second
        << "&nbsp;&nbsp; ";
    }
    o << "</div>\n<table><tr><th>run</th>";
    for (const auto& ph : kPhases) o << "<th>" << ph.second << " ms</th>";
    o << "<th>step ms</th></tr>\n";
    for (const Row& r : rows) {
      o << "<tr><td>" << Escape(r.name) << "</td>";
      for (double m : r.ms) o << "<td>" << Num(m) << "</td>";
      o << "<td>" << Num(r.total) << "</td></tr>\n";
    }
    o << "</table>\n<p class=\"empty\">Host wall time. \"server and wire\" is the rest of the "
         "step: the server's part and the network (in <code>splitq train</code>, the server "
         "part in-process). On CUDA, kernels run asynchronously, so a phase shows when its work "
         "was issued and waited for.</p>\n";
  }
  if (!missing.empty()) {
    o << "<p class=\"empty\">No breakdown logged by: " << Escape(missing)
      << " (runs before 2026-12-07).</p>\n";
  }
  o << "</section>\n";
  return o.str();
}

std::string RenderReport(const std::vector<RunData>& runs) {
  std::ostringstream o;
  std::string names;
  for (const RunData& r : runs) absl::StrAppend(&names, names.empty() ? "" : ", ", r.name);
  o << "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>splitq report: "
    << Escape(names) << "</title>\n<style>\n"
    << "body{font-family:sans-serif;margin:24px;color:#222}h1{font-size:20px}"
       "h2{font-size:15px;margin:18px 0 4px}.tick{font-size:10px;fill:#555}"
       ".axis{font-size:11px;fill:#333}.legend{font-size:12px;margin:2px 0 10px}"
       "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}"
       ".empty{color:#888;font-size:12px}\n</style></head><body>\n"
    << "<h1>splitq report: " << Escape(names) << "</h1>\n";
  o << Chart("loss", "Training loss", "loss", Collect(runs, false, "loss", "", ""), {});
  o << Chart("val_loss", "Validation loss", "loss", Collect(runs, true, "val_loss", "", ""), {});
  const std::vector<Series> accuracy = Collect(runs, true, "val_accuracy", "", "");
  if (!accuracy.empty())
    o << Chart("val_accuracy", "Validation accuracy", "accuracy", accuracy, {});
  const std::vector<Series> bpb = Collect(runs, true, "val_bits_per_byte", "", "");
  if (!bpb.empty())
    o << Chart("val_bits_per_byte", "Validation bits per byte", "bits/byte", bpb, {});
  std::vector<Series> bits = Collect(runs, false, "act_bits", "", ": activations");
  Append(&bits, Collect(runs, false, "grad_bits", kDashed, ": gradients"));
  // The budgets over steps (metrics lines since 2026-12-07); runs that predate them get
  // their final budgets from summary.json as horizontal lines.
  std::vector<Series> act_budget =
      Collect(runs, false, "act_budget", kDotted, ": activation budget");
  std::vector<Series> grad_budget =
      Collect(runs, false, "grad_budget", kDotted, ": gradient budget");
  Append(&bits, std::move(act_budget));
  Append(&bits, std::move(grad_budget));
  std::vector<HLine> budgets;
  for (size_t r = 0; r < runs.size(); ++r) {
    const auto& m = runs[r].metrics;
    if (std::any_of(m.begin(), m.end(), [](const FlatRecord& rec) {
          return rec.numbers.count("act_budget") + rec.numbers.count("grad_budget") > 0;
        })) {
      continue;  // plotted over steps
    }
    const auto& n = runs[r].summary.numbers;
    const std::string color = kColors[r % (sizeof kColors / sizeof kColors[0])];
    if (const auto b = n.find("act_budget"); b != n.end()) {
      budgets.push_back({runs[r].name + ": activation budget (final)", color, b->second});
    }
    if (const auto b = n.find("grad_budget"); b != n.end()) {
      budgets.push_back({runs[r].name + ": gradient budget (final)", color, b->second});
    }
  }
  o << Chart("bits", "Bits per element in use (nominal code widths)", "bits", bits, budgets);
  std::vector<Series> wire = Collect(runs, false, "wire_bits_up", "", ": wire up");
  Append(&wire, Collect(runs, false, "wire_bits_down", kDashed, ": wire down"));
  Append(&wire, Collect(runs, false, "code_entropy_bits_up", kDotted, ": code entropy up"));
  Append(&wire, Collect(runs, false, "code_entropy_bits_down", kDotted, ": code entropy down"));
  o << Chart("wire",
             "Wire bits per element (bytes x 8 / elements, all counted) and the codes' entropy",
             "bits", wire, {});
  for (size_t r = 0; r < runs.size(); ++r) o << BitMap(runs[r], r);
  o << Chart("step_ms", "Step time", "ms", Collect(runs, false, "step_ms", "", ""), {});
  o << StepBreakdown(runs);
  o << SummaryTable(runs);
  o << "</body></html>\n";
  return o.str();
}

absl::Status WriteReport(const std::vector<std::string>& dirs, const std::string& out) {
  if (dirs.empty()) return absl::InvalidArgumentError("no run directories given");
  std::vector<RunData> runs;
  for (const std::string& d : dirs) {
    SPLITQ_ASSIGN_OR_RETURN(RunData run, ReadRun(d));
    runs.push_back(std::move(run));
  }
  return base::WriteFileAtomically(out, RenderReport(runs));
}

}  // namespace splitq::tools
