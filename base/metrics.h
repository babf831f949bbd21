// splitq base: live numbers for Prometheus (server/metrics_server.h serves them at /metrics).
//
// A Registry holds metric families (a name, a help line, a type) and, in each, one child per
// set of label values. Children are made once and live as long as the registry, so hot paths
// keep a pointer and update it lock-free:
//
//   base::Registry registry;
//   base::Metric* steps = registry.Counter("splitq_worker_steps_total", "Steps answered");
//   steps->Add(1);
//   base::Histogram* latency = registry.Histo("splitq_worker_step_seconds", "...",
//                                             {0.01, 0.1, 1});
//   latency->Observe(0.042);
//
// Values that already live elsewhere (a core's counts) are copied in just before each scrape
// by OnScrape callbacks. Render() writes the Prometheus text exposition format (version
// 0.0.4): families sorted by name, each with its # HELP and # TYPE lines; label values
// escaped. Names must match [a-zA-Z_:][a-zA-Z0-9_:]* and label names [a-zA-Z_][a-zA-Z0-9_]*
// (std::invalid_argument otherwise: a programming error, not input). Asking again for a name
// with the same labels returns the same child; with another type it throws.
//
// Thread-safe: any thread may make children, update them and render.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace splitq::base {

using Labels = std::vector<std::pair<std::string, std::string>>;

// A counter (only Add with n >= 0, by convention) or a gauge (Set, Add).
class Metric {
 public:
  void Add(double n);
  void Set(double v) { value_.store(v, std::memory_order_relaxed); }
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0};
};

// Counts of observations at or below each upper bound (ascending; +Inf is implied), their
// sum and count.
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void Observe(double v);
  const std::vector<double>& bounds() const { return bounds_; }
  // Cumulative counts per bound, then the count of all (the +Inf bucket), and the sum.
  std::vector<uint64_t> cumulative() const;
  double sum() const { return sum_.value(); }

 private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> counts_;  // per bound, then above the last
  Metric sum_;
};

class Registry {
 public:
  Registry();
  ~Registry();
  Metric* Counter(const std::string& name, const std::string& help, const Labels& labels = {});
  Metric* Gauge(const std::string& name, const std::string& help, const Labels& labels = {});
  Histogram* Histo(const std::string& name, const std::string& help, std::vector<double> bounds,
                   const Labels& labels = {});
  // Runs before each Render (under the registry's render lock, in the order added).
  void OnScrape(std::function<void()> fn);
  std::string Render();

 private:
  struct Family;
  Family& FamilyOf(const std::string& name, const std::string& help, const char* type);
  Metric* Value(const std::string& name, const std::string& help, const Labels& labels,
                const char* type);
  std::mutex mutex_;  // families_ and scrape callbacks
  std::map<std::string, std::unique_ptr<Family>> families_;
  std::vector<std::function<void()>> on_scrape_;
  std::mutex render_mutex_;
};

// Buckets for latencies in seconds: 1 ms to 60 s, about 2.5x apart.
std::vector<double> LatencyBuckets();

}  // namespace splitq::base
