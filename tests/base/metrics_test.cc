// base/metrics.h: the text Prometheus reads (HELP and TYPE once per family, sorted families,
// label values escaped, shortest numbers), histograms cumulative with +Inf, children shared,
// bad names and type clashes refused, and counts exact under concurrent updates.
#include "base/metrics.h"

#include <gtest/gtest.h>

#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace splitq::base {
namespace {

TEST(Metrics, RenderWritesTheTextFormat) {
  Registry r;
  Metric* b = r.Counter("splitq_b_total", "B things", {{"kind", "x\"y\\z\nw"}});
  b->Add(2);
  b->Add(0.5);
  r.Gauge("splitq_a", "An \\ a\nline")->Set(-3);
  EXPECT_EQ(r.Counter("splitq_b_total", "B things", {{"kind", "x\"y\\z\nw"}}), b);  // shared
  Histogram* h = r.Histo("splitq_c_seconds", "C", {0.0025, 1}, {{"k", "v"}});
  h->Observe(0.001);
  h->Observe(0.0025);  // at a bound: counted in it
  h->Observe(7);
  int scraped = 0;
  r.OnScrape([&] { r.Gauge("splitq_a", "")->Set(++scraped); });
  const std::string text = r.Render();
  EXPECT_EQ(text,
            "# HELP splitq_a An \\\\ a\\nline\n"
            "# TYPE splitq_a gauge\n"
            "splitq_a 1\n"
            "# HELP splitq_b_total B things\n"
            "# TYPE splitq_b_total counter\n"
            "splitq_b_total{kind=\"x\\\"y\\\\z\\nw\"} 2.5\n"
            "# HELP splitq_c_seconds C\n"
            "# TYPE splitq_c_seconds histogram\n"
            "splitq_c_seconds_bucket{k=\"v\",le=\"0.0025\"} 2\n"
            "splitq_c_seconds_bucket{k=\"v\",le=\"1\"} 2\n"
            "splitq_c_seconds_bucket{k=\"v\",le=\"+Inf\"} 3\n"
            "splitq_c_seconds_sum{k=\"v\"} 7.0035\n"
            "splitq_c_seconds_count{k=\"v\"} 3\n");
  EXPECT_NE(r.Render().find("splitq_a 2\n"), std::string::npos);  // callbacks run each time
}

TEST(Metrics, BadNamesAndClashesAreRefused) {
  Registry r;
  EXPECT_THROW(r.Counter("1abc", "x"), std::invalid_argument);
  EXPECT_THROW(r.Counter("a-b", "x"), std::invalid_argument);
  EXPECT_THROW(r.Counter("ok", "x", {{"bad-label", "v"}}), std::invalid_argument);
  EXPECT_THROW(r.Histo("h", "x", {1}, {{"le", "v"}}), std::invalid_argument);
  EXPECT_THROW(r.Histo("h", "x", {2, 1}), std::invalid_argument);
  r.Counter("splitq:ok_total", "x");
  EXPECT_THROW(r.Gauge("splitq:ok_total", "x"), std::invalid_argument);
}

TEST(Metrics, ConcurrentUpdatesAreExact) {
  Registry r;
  Metric* c = r.Counter("n_total", "n");
  Histogram* h = r.Histo("h", "h", LatencyBuckets());
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 10000; ++i) {
        c->Add(1);
        h->Observe(0.003);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(c->value(), 40000);
  EXPECT_EQ(h->cumulative().back(), 40000u);
  EXPECT_NE(r.Render().find("h_bucket{le=\"0.005\"} 40000\n"), std::string::npos);
}

}  // namespace
}  // namespace splitq::base
