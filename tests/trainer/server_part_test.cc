// trainer/server_part.h, merged batches: K sessions' steps through TrainMerged give the server
// the update one session gives for the K batches concatenated (to float tolerance on the
// CPU), each client its own slice of the gradient scaled to its own mean loss, and its own
// loss; a bad frame fails alone; replicas that take the same updates report the same digest.
#include "trainer/server_part.h"

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <yaml-cpp/yaml.h>

#include <memory>
#include <vector>

#include "tests/trainer/fp32_server.h"
#include "trainer/boundary.h"

namespace splitq::trainer {
namespace {

using testing::FrameOf;
using testing::NewFp32Server;

at::Tensor Gradient(const DownFrame& down) {
  auto g = internal::DecodeRawTensor(down.frame);
  EXPECT_TRUE(g.ok()) << g.status();
  return *g;
}

// The AQ-SGD cache's bound counts each sample id not held yet once, against the bytes held.
TEST(DeltaCacheTest, AdmitBoundsTheSamplesHeld) {
  internal::DeltaCache cache;
  cache.Update(torch::tensor({0, 1, 2}, at::kLong), torch::zeros({3, 4}));  // 8 bytes a sample
  const auto ids = [](std::vector<int64_t> v) { return torch::tensor(v, at::kLong); };
  EXPECT_TRUE(cache.Admit(ids({2, 3, 3}), 8, 32).ok());  // 4 samples: 32 bytes
  const absl::Status over = cache.Admit(ids({3, 4}), 8, 32);
  EXPECT_EQ(over.code(), absl::StatusCode::kResourceExhausted) << over;
  EXPECT_NE(over.message().find("server.aqsgd_max_cache_mib"), std::string::npos) << over;
  EXPECT_TRUE(cache.Admit(ids({0, 0, 1}), 8, 24).ok());  // nothing new
}

TEST(ServerPartMerge, EqualsOneSessionOnTheConcatenatedBatch) {
  auto merged = NewFp32Server();
  auto single = NewFp32Server();
  EXPECT_EQ(merged->WeightsDigest(), single->WeightsDigest());  // same seed, same start
  std::vector<int64_t> shape{0};
  for (int64_t d : merged->input_shape()) shape.push_back(d);

  const std::vector<int64_t> rows{4, 7, 5};
  std::vector<at::Tensor> hs, labels;
  std::vector<UpFrame> ups;
  std::vector<std::pair<uint64_t, const UpFrame*>> steps;
  for (size_t k = 0; k < rows.size(); ++k) {
    shape[0] = rows[k];
    hs.push_back(torch::randn(shape));
    labels.push_back(torch::randint(0, 10, {rows[k]}, at::kLong));
    ups.push_back(FrameOf(hs.back(), labels.back(), 3 + static_cast<int64_t>(k)));
  }
  for (size_t k = 0; k < rows.size(); ++k) steps.emplace_back(merged->OpenSession(), &ups[k]);
  const auto results = merged->TrainMerged(steps);
  const uint64_t one = single->OpenSession();
  auto whole = single->Train(one, FrameOf(at::cat(hs), at::cat(labels), 5), true);
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_EQ(merged->updates(), 1);
  EXPECT_EQ(single->updates(), 1);

  const at::Tensor g = Gradient(*whole);
  const int64_t total = 16;
  int64_t row = 0;
  double loss_sum = 0;
  for (size_t k = 0; k < rows.size(); ++k) {
    ASSERT_TRUE(results[k].ok()) << results[k].status();
    EXPECT_EQ(results[k]->step, ups[k].step);
    const at::Tensor mine = Gradient(*results[k]);
    const at::Tensor want = g.narrow(0, row, rows[k]) * (static_cast<double>(total) / rows[k]);
    EXPECT_TRUE(at::allclose(mine, want, 1e-4, 1e-6))
        << "client " << k << ": " << (mine - want).abs().max().item<double>();
    loss_sum += results[k]->loss * static_cast<double>(rows[k]);
    row += rows[k];
  }
  EXPECT_NEAR(loss_sum / total, whole->loss, 1e-5);  // the merged loss is the mean over all
  const auto a = merged->Weights();
  const auto b = single->Weights();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(at::allclose(a[i], b[i], 1e-5, 1e-6))
        << "weight " << i << ": " << (a[i] - b[i]).abs().max().item<double>();
  }
}

TEST(ServerPartMerge, ABadFrameFailsAlone) {
  auto server = NewFp32Server();
  std::vector<int64_t> shape{4};
  for (int64_t d : server->input_shape()) shape.push_back(d);
  UpFrame good = FrameOf(torch::randn(shape), torch::randint(0, 10, {4}, at::kLong), 0);
  UpFrame bad = good;
  bad.frame = std::make_shared<const std::string>("not a frame");
  UpFrame wrong_labels = good;
  wrong_labels.labels.pop_back();
  const auto results = server->TrainMerged({{server->OpenSession(), &good},
                                            {server->OpenSession(), &bad},
                                            {server->OpenSession(), &wrong_labels},
                                            {999, &good}});
  ASSERT_EQ(results.size(), 4u);
  EXPECT_TRUE(results[0].ok()) << results[0].status();
  EXPECT_EQ(results[1].status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(results[2].status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(results[3].status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(server->updates(), 1);
  // Nothing valid: no update.
  const auto none = server->TrainMerged({{server->OpenSession(), &bad}, {998, &good}});
  EXPECT_FALSE(none[0].ok());
  EXPECT_FALSE(none[1].ok());
  EXPECT_EQ(server->updates(), 1);
}

// server.merge.threads changes who decodes and encodes, not what: one thread and four give
// the same gradients, losses and weights, and a step with values over server.max_abs_input
// fails alone on either. The phases are counted once per round with work.
TEST(ServerPartMerge, ThreadsChangeNothingButTime) {
  std::vector<int64_t> shape{5};
  for (int64_t d : NewFp32Server()->input_shape()) shape.push_back(d);
  std::vector<UpFrame> ups;
  for (int64_t k = 0; k < 4; ++k) {
    ups.push_back(FrameOf(torch::randn(shape), torch::randint(0, 10, {5}, at::kLong), k));
  }
  ups.push_back(FrameOf(torch::full(shape, 1e6), torch::randint(0, 10, {5}, at::kLong), 4));
  std::vector<std::unique_ptr<ServerPart>> servers;
  std::vector<std::vector<absl::StatusOr<DownFrame>>> results;
  for (int64_t threads : {1, 4}) {
    RunConfig c = testing::Fp32Config();
    c.merge_threads = threads;
    servers.push_back(NewFp32Server(c));
    ServerPart& server = *servers.back();
    std::vector<std::pair<uint64_t, const UpFrame*>> steps;
    for (const UpFrame& up : ups) steps.emplace_back(server.OpenSession(), &up);
    results.push_back(server.TrainMerged(steps));
    EXPECT_EQ(server.updates(), 1);
    const RoundTimes t = server.round_times();
    EXPECT_EQ(t.rounds, 1);
    EXPECT_GE(t.total_ms, t.inputs_ms + t.compute_ms + t.gradients_ms);
  }
  for (size_t k = 0; k < ups.size(); ++k) {
    if (k + 1 == ups.size()) {
      for (const auto& r : results) {
        EXPECT_EQ(r[k].status().code(), absl::StatusCode::kInvalidArgument) << r[k].status();
      }
      continue;
    }
    ASSERT_TRUE(results[0][k].ok()) << results[0][k].status();
    ASSERT_TRUE(results[1][k].ok()) << results[1][k].status();
    EXPECT_EQ(results[0][k]->loss, results[1][k]->loss);
    EXPECT_TRUE(at::equal(Gradient(*results[0][k]), Gradient(*results[1][k]))) << k;
  }
  EXPECT_EQ(servers[0]->WeightsDigest(), servers[1]->WeightsDigest());
}

}  // namespace
}  // namespace splitq::trainer
