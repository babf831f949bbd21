#include "base/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>

namespace splitq::base {

namespace {

bool ValidName(const std::string& name, bool colon) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool letter =
        (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (colon && c == ':');
    if (!letter && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

std::string Number(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buffer[32];
  if (v == std::floor(v) && std::fabs(v) < 9007199254740992.0) {  // whole: 60, not 6e+01
    std::snprintf(buffer, sizeof buffer, "%.0f", v);
    return buffer;
  }
  // The shortest text that reads back as the same double (0.0025, not 0.0025000000000000001).
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buffer, sizeof buffer, "%.*g", precision, v);
    if (std::strtod(buffer, nullptr) == v) break;
  }
  return buffer;
}

std::string Escaped(const std::string& s, bool quote) {
  std::string out;
  for (char c : s) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else if (quote && c == '"') {
      out += "\\\"";
    } else {
      out += c;
    }
  }
  return out;
}

// {a="x",b="y"} with `extra` (le="...") last; "" for no labels.
std::string LabelText(const Labels& labels, const std::string& extra = "") {
  if (labels.empty() && extra.empty()) return "";
  std::string out = "{";
  for (size_t i = 0; i < labels.size(); ++i) {
    if (i > 0) out += ",";
    out += labels[i].first + "=\"" + Escaped(labels[i].second, true) + "\"";
  }
  if (!extra.empty()) out += (labels.empty() ? "" : ",") + extra;
  return out + "}";
}

}  // namespace

void Metric::Add(double n) {
  double old = value_.load(std::memory_order_relaxed);
  while (!value_.compare_exchange_weak(old, old + n, std::memory_order_relaxed)) {
  }
}

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(new std::atomic<uint64_t>[bounds_.size() + 1]) {
  if (!std::is_sorted(bounds_.begin(), bounds_.end())) {
    throw std::invalid_argument("histogram bounds must ascend");
  }
  for (size_t i = 0; i <= bounds_.size(); ++i) counts_[i].store(0);
}

void Histogram::Observe(double v) {
  const size_t i =
      static_cast<size_t>(std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin());
  counts_[i].fetch_add(1, std::memory_order_relaxed);
  sum_.Add(v);
}

std::vector<uint64_t> Histogram::cumulative() const {
  std::vector<uint64_t> out(bounds_.size() + 1);
  uint64_t running = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    running += counts_[i].load(std::memory_order_relaxed);
    out[i] = running;
  }
  return out;
}

struct Registry::Family {
  std::string help, type;
  std::map<Labels, std::unique_ptr<Metric>> values;
  std::map<Labels, std::unique_ptr<Histogram>> histograms;
};

Registry::Registry() = default;
Registry::~Registry() = default;

Registry::Family& Registry::FamilyOf(const std::string& name, const std::string& help,
                                     const char* type) {
  if (!ValidName(name, true)) throw std::invalid_argument("bad metric name '" + name + "'");
  std::unique_ptr<Family>& f = families_[name];
  if (!f) {
    f = std::make_unique<Family>();
    f->help = help;
    f->type = type;
  } else if (f->type != type) {
    throw std::invalid_argument("metric '" + name + "' is a " + f->type + ", not a " + type);
  }
  return *f;
}

static void CheckLabels(const Labels& labels) {
  for (const auto& [k, v] : labels) {
    if (!ValidName(k, false) || k == "le") {
      throw std::invalid_argument("bad label name '" + k + "'");
    }
  }
}

Metric* Registry::Value(const std::string& name, const std::string& help, const Labels& labels,
                        const char* type) {
  CheckLabels(labels);
  std::lock_guard<std::mutex> lock(mutex_);
  std::unique_ptr<Metric>& m = FamilyOf(name, help, type).values[labels];
  if (!m) m = std::make_unique<Metric>();
  return m.get();
}

Metric* Registry::Counter(const std::string& name, const std::string& help, const Labels& labels) {
  return Value(name, help, labels, "counter");
}

Metric* Registry::Gauge(const std::string& name, const std::string& help, const Labels& labels) {
  return Value(name, help, labels, "gauge");
}

Histogram* Registry::Histo(const std::string& name, const std::string& help,
                           std::vector<double> bounds, const Labels& labels) {
  CheckLabels(labels);
  std::lock_guard<std::mutex> lock(mutex_);
  std::unique_ptr<Histogram>& h = FamilyOf(name, help, "histogram").histograms[labels];
  if (!h) h = std::make_unique<Histogram>(std::move(bounds));
  return h.get();
}

void Registry::OnScrape(std::function<void()> fn) {
  std::lock_guard<std::mutex> lock(mutex_);
  on_scrape_.push_back(std::move(fn));
}

std::string Registry::Render() {
  std::lock_guard<std::mutex> render(render_mutex_);
  std::vector<std::function<void()>> callbacks;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    callbacks = on_scrape_;
  }
  for (const auto& fn : callbacks) fn();
  std::lock_guard<std::mutex> lock(mutex_);
  std::string out;
  for (const auto& [name, f] : families_) {
    out += "# HELP " + name + " " + Escaped(f->help, false) + "\n";
    out += "# TYPE " + name + " " + f->type + "\n";
    for (const auto& [labels, m] : f->values) {
      out += name + LabelText(labels) + " " + Number(m->value()) + "\n";
    }
    for (const auto& [labels, h] : f->histograms) {
      const std::vector<uint64_t> counts = h->cumulative();
      for (size_t i = 0; i < counts.size(); ++i) {
        const std::string le = i < h->bounds().size() ? Number(h->bounds()[i]) : "+Inf";
        out += name + "_bucket" + LabelText(labels, "le=\"" + le + "\"") + " " +
               std::to_string(counts[i]) + "\n";
      }
      out += name + "_sum" + LabelText(labels) + " " + Number(h->sum()) + "\n";
      out += name + "_count" + LabelText(labels) + " " + std::to_string(counts.back()) + "\n";
    }
  }
  return out;
}

std::vector<double> LatencyBuckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
}

}  // namespace splitq::base
