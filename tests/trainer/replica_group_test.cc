// trainer/replica_group.h and ServerPart's rounds (server_part.h, "Worker groups"), with Gloo
// over loopback and the members as threads of this process: the collectives compute what
// they say; two replicas in a group take the same update, which is the update one part takes
// on both replicas' batches merged; idle rounds take none; a member that never comes is an
// UNAVAILABLE error within the timeout.
#include "trainer/replica_group.h"

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <yaml-cpp/yaml.h>

#include <condition_variable>
#include <functional>
#include <future>
#include <memory>
#include <thread>
#include <vector>

#include "tests/trainer/fp32_server.h"
#include "trainer/server_part.h"

namespace splitq::trainer {
namespace {

// A group of `world` members on a store hosted by rank 0; runs fn(rank, group) on a thread each.
void InGroup(int world, const std::function<void(int, ReplicaGroup&)>& fn) {
  ReplicaGroupOptions o;
  o.world = world;
  o.host_store = true;
  o.timeout = std::chrono::milliseconds(20000);
  // Rank 0 hosts the store on a port the OS picks; the others learn it from rank 0's group.
  std::promise<int> port;
  std::shared_future<int> known = port.get_future().share();
  std::vector<std::thread> threads;
  for (int rank = 0; rank < world; ++rank) {
    threads.emplace_back([&, rank] {
      ReplicaGroupOptions mine = o;
      mine.rank = rank;
      std::unique_ptr<ReplicaGroup> group;
      if (rank == 0) {
        mine.world = world;
        // The store exists once Create has started; Create returns when all have joined, so
        // rank 0 publishes the port from a store it makes first.
        auto g = ReplicaGroup::Create(mine, at::kCPU, [&](int p) { port.set_value(p); });
        ASSERT_TRUE(g.ok()) << g.status();
        group = std::move(*g);
      } else {
        mine.host_store = false;
        mine.store_port = known.get();
        auto g = ReplicaGroup::Create(mine, at::kCPU);
        ASSERT_TRUE(g.ok()) << g.status();
        group = std::move(*g);
      }
      fn(rank, *group);
    });
  }
  for (auto& t : threads) t.join();
}

TEST(ReplicaGroup, CollectivesComputeWhatTheySay) {
  InGroup(3, [](int rank, ReplicaGroup& g) {
    EXPECT_EQ(g.world(), 3);
    EXPECT_EQ(g.backend(), "gloo");
    auto max = g.Max({rank * 10, int64_t{1} << 40, -rank});
    ASSERT_TRUE(max.ok()) << max.status();
    EXPECT_EQ(*max, (std::vector<int64_t>{20, int64_t{1} << 40, 0}));
    std::vector<at::Tensor> t{torch::full({2, 3}, rank + 1.0f), torch::full({4}, rank + 1.0),
                              torch::full({1}, rank + 0.5f)};
    ASSERT_TRUE(g.SumInPlace(t).ok());
    EXPECT_TRUE(at::allclose(t[0], torch::full({2, 3}, 6.0f)));
    EXPECT_TRUE(at::allclose(t[1], torch::full({4}, 6.0)));
    EXPECT_TRUE(at::allclose(t[2], torch::full({1}, 4.5f)));
    auto b = g.Broadcast(rank == 1 ? std::string("state\0bytes", 11) : std::string(), 1);
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ(*b, std::string("state\0bytes", 11));
  });
}

// Buckets in reverse order of the list, each one dtype and at most the bytes asked for; places
// added in any order and scaled; a place never added counts as zero; a bucket starts from Add
// once it and every bucket before it are filled; Discard forgets what did not start.
TEST(ReplicaGroup, BucketedSumsAddUpInAnyOrder) {
  InGroup(2, [](int rank, ReplicaGroup& g) {
    // 4 floats, 3 floats, 2 doubles, 5 floats: 16-byte buckets make [5f: 20 B alone], [2d],
    // [3f], [4f].
    const std::vector<at::Tensor> like{torch::zeros({4}), torch::zeros({3}),
                                       torch::zeros({2}, at::kDouble), torch::zeros({5})};
    auto sum = g.StartSum(like, 16);
    EXPECT_EQ(sum->buckets(), 4);
    const float r = static_cast<float>(rank + 1);
    // Tensor 0 sits in the last bucket: nothing can start before the first bucket (tensor 3).
    sum->Add(0, torch::full({4}, r), 2.0);
    EXPECT_EQ(sum->started_early(), 0);
    sum->Add(2, torch::full({2}, static_cast<double>(r), at::kDouble), 1.0);
    EXPECT_EQ(sum->started_early(), 0);
    sum->Add(3, torch::full({5}, r), 1.0);
    EXPECT_EQ(sum->started_early(), 2);  // [5f] and then [2d]
    // Tensor 1 never added: zeros.
    ASSERT_TRUE(sum->Finish().ok());
    EXPECT_TRUE(at::equal(sum->sum(0), torch::full({4}, 6.0f)));  // 2 * (1 + 2)
    EXPECT_TRUE(at::equal(sum->sum(1), torch::zeros({3})));
    EXPECT_TRUE(at::equal(sum->sum(2), torch::full({2}, 3.0, at::kDouble)));
    EXPECT_TRUE(at::equal(sum->sum(3), torch::full({5}, 3.0f)));

    // Discard drops the places of buckets not started.
    auto again = g.StartSum(like, 0);  // no limit: [5f], [2d], [4f 3f]
    EXPECT_EQ(again->buckets(), 3);
    again->Add(1, torch::full({3}, r), 1.0);
    EXPECT_FALSE(again->Discard());
    again->Add(3, torch::full({5}, r), 1.0);
    EXPECT_TRUE(again->Discard());
    ASSERT_TRUE(again->Finish().ok());
    EXPECT_TRUE(at::equal(again->sum(3), torch::full({5}, 3.0f)));
    EXPECT_TRUE(at::equal(again->sum(1), torch::zeros({3})));

    // A value for a bucket that has started cannot count: late() says so (the caller poisons
    // the round), and the collectives still all run, so the group stays usable.
    auto late = g.StartSum(like, 16);
    for (size_t i = 0; i < like.size(); ++i) late->Add(i, like[i], 1.0);
    EXPECT_TRUE(late->added(3));
    EXPECT_FALSE(late->late());
    if (rank == 0) late->Add(3, like[3], 1.0);
    EXPECT_EQ(late->late(), rank == 0);
    EXPECT_TRUE(late->Finish().ok());
    EXPECT_FALSE(g.broken());
    // A sum dropped unfinished starts its buckets anyway: the next collective still matches.
    {
      auto dropped = g.StartSum(like, 16);
      if (rank == 1) dropped->Add(3, like[3], 1.0);
    }
    auto max = g.Max({rank});
    ASSERT_TRUE(max.ok()) << max.status();
    EXPECT_EQ((*max)[0], 1);
  });
}

// Many groups of one process start their first collectives at the same moment, round after
// round. On PyTorch 2.x this raced in the collective flight recorder (a process-wide map,
// changed outside its lock: a SIGSEGV in a few percent of runs of the tests above); it must
// not crash or mix the groups up. Run it with TORCH_FR_BUFFER_SIZE=2000 set to see the race
// on PyTorch 2.x (replica_group.cc turns the recorder off only when the user set no size).
TEST(ReplicaGroup, ManyGroupsOfOneProcessStartTogether) {
  ReplicaGroupOptions host;
  host.host_store = true;
  host.generation = 1000;
  auto store_owner = ReplicaGroup::Create(host, at::kCPU);
  ASSERT_TRUE(store_owner.ok()) << store_owner.status();
  const int port = (*store_owner)->store_port();
  constexpr int kGroups = 8;
  constexpr int kRounds = 12;
  for (int round = 0; round < kRounds; ++round) {
    std::mutex mutex;
    std::condition_variable cv;
    int ready = 0;
    std::vector<std::vector<int64_t>> got(kGroups);
    std::vector<std::thread> threads;
    for (int k = 0; k < kGroups; ++k) {
      threads.emplace_back([&, k] {
        ReplicaGroupOptions o;
        o.store_port = port;
        o.generation = round * kGroups + k;  // a group of one each, on the shared store
        auto g = ReplicaGroup::Create(o, at::kCPU);
        {
          std::unique_lock<std::mutex> lock(mutex);
          ++ready;
          cv.notify_all();
          cv.wait(lock, [&] { return ready == kGroups; });
        }
        ASSERT_TRUE(g.ok()) << g.status();
        auto max = (*g)->Max({k, round});
        ASSERT_TRUE(max.ok()) << max.status();
        got[k] = *max;
      });
    }
    for (auto& t : threads) t.join();
    for (int k = 0; k < kGroups; ++k) {
      EXPECT_EQ(got[k], (std::vector<int64_t>{k, round})) << "round " << round << ", group " << k;
    }
  }
}

TEST(ReplicaGroup, AMissingMemberIsUnavailable) {
  ReplicaGroupOptions o;
  o.world = 2;
  o.host_store = true;
  o.timeout = std::chrono::milliseconds(1500);
  const auto start = std::chrono::steady_clock::now();
  auto g = ReplicaGroup::Create(o, at::kCPU);
  EXPECT_EQ(g.status().code(), absl::StatusCode::kUnavailable) << g.status();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));
  o.rank = 2;
  EXPECT_EQ(ReplicaGroup::Create(o, at::kCPU).status().code(), absl::StatusCode::kInvalidArgument);
}

// NCCL, a group of one on the GPU (skips without one): the collectives run on device tensors.
TEST(ReplicaGroup, NcclGroupOfOne) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no GPU: the NCCL backend needs one";
  ReplicaGroupOptions o;
  o.host_store = true;
  o.backend = "nccl";
  auto g = ReplicaGroup::Create(o, at::Device(at::kCUDA));
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ((*g)->backend(), "nccl");
  auto max = (*g)->Max({7, -1});
  ASSERT_TRUE(max.ok()) << max.status();
  EXPECT_EQ(*max, (std::vector<int64_t>{7, -1}));
  std::vector<at::Tensor> t{torch::full({3}, 2.0f, at::Device(at::kCUDA))};
  ASSERT_TRUE((*g)->SumInPlace(t).ok());
  EXPECT_EQ(t[0].sum().item<float>(), 6.0f);
  auto b = (*g)->Broadcast("abc", 0);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(*b, "abc");
}

using testing::FrameOf;

// One round of three clients' steps: replica 0 serves ups[0] and ups[1], replica 1 ups[2].
void ThreeClientRound(int rank, ServerPart& part, const std::vector<UpFrame>& ups) {
  std::vector<std::pair<uint64_t, const UpFrame*>> steps;
  if (rank == 0) {
    steps = {{part.OpenSession(), &ups[0]}, {part.OpenSession(), &ups[1]}};
  } else {
    steps = {{part.OpenSession(), &ups[2]}};
  }
  for (const auto& r : part.TrainMerged(steps)) EXPECT_TRUE(r.ok()) << r.status();
}

// Replica 0 serves two clients (4 and 7 examples), replica 1 one (5): after the round both
// hold the weights one part gets from the three batches merged. Then an idle round (no
// update), then a round where only replica 1 has a step (both update, still identical).
TEST(ReplicaGroupServerPart, ReplicasTakeTheMergedUpdate) {
  auto single = testing::NewFp32Server();
  std::vector<int64_t> shape{0};
  for (int64_t d : single->input_shape()) shape.push_back(d);
  const std::vector<int64_t> rows{4, 7, 5};
  std::vector<at::Tensor> hs, labels;
  std::vector<UpFrame> ups;
  torch::manual_seed(1);
  for (size_t k = 0; k < rows.size(); ++k) {
    shape[0] = rows[k];
    hs.push_back(torch::randn(shape));
    labels.push_back(torch::randint(0, 10, {rows[k]}, at::kLong));
    ups.push_back(FrameOf(hs.back(), labels.back(), 2));
  }
  const uint64_t one = single->OpenSession();
  ASSERT_TRUE(single->Train(one, FrameOf(at::cat(hs), at::cat(labels), 2), true).ok());

  auto first_round = [&](int rank, ServerPart& part) { ThreeClientRound(rank, part, ups); };
  std::vector<std::unique_ptr<ServerPart>> replicas(2);
  replicas[0] = testing::NewFp32Server();
  replicas[1] = testing::NewFp32Server();
  std::vector<std::string> digests(2);
  InGroup(2, [&](int rank, ReplicaGroup& group) {
    ServerPart& part = *replicas[rank];
    part.set_group(&group);
    first_round(rank, part);
    EXPECT_EQ(part.updates(), 1);
    EXPECT_TRUE(part.TrainMerged({}).empty());  // idle round
    EXPECT_EQ(part.updates(), 1);
    UpFrame late = ups[2];
    late.step = 3;
    std::vector<std::pair<uint64_t, const UpFrame*>> only;
    if (rank == 1) only = {{part.OpenSession(), &late}};
    for (const auto& r : part.TrainMerged(only)) EXPECT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(part.updates(), 2);
    digests[rank] = part.WeightsDigest();
    part.set_group(nullptr);
  });
  EXPECT_EQ(digests[0], digests[1]);
  // The first round equals one part's update on the three batches merged: compare a fresh
  // pair of replicas after one round only.
  std::vector<std::unique_ptr<ServerPart>> again(2);
  again[0] = testing::NewFp32Server();
  again[1] = testing::NewFp32Server();
  InGroup(2, [&](int rank, ReplicaGroup& group) {
    ServerPart& part = *again[rank];
    part.set_group(&group);
    first_round(rank, part);
    part.set_group(nullptr);
  });
  // Compared as updates (weights minus the common start), relative to the update's size: AdamW's
  // first step divides each gradient by its own magnitude, which turns float rounding in tiny
  // gradient components into visible (but tiny) differences of single weights.
  const auto start = testing::NewFp32Server()->Weights();
  const auto a = again[0]->Weights();
  const auto b = single->Weights();
  for (size_t i = 0; i < a.size(); ++i) {
    const at::Tensor da = a[i] - start[i], db = b[i] - start[i];
    const double rel = (da - db).norm().item<double>() / db.norm().item<double>();
    EXPECT_LT(rel, 1e-3) << "weight " << i;
  }
  EXPECT_EQ(again[0]->WeightsDigest(), again[1]->WeightsDigest());
}

// Buckets that start during the backward pass (server.group.bucket_kib) change nothing but
// time: two rounds of a group of 2 with 1 KiB buckets end bit-equal to the same rounds with
// one sum after the backward pass, and equal between the replicas.
TEST(ReplicaGroupServerPart, BucketsDuringTheBackwardPassChangeNothing) {
  std::vector<int64_t> shape{0};
  for (int64_t d : testing::NewFp32Server()->input_shape()) shape.push_back(d);
  const std::vector<int64_t> rows{4, 7, 5};
  std::vector<UpFrame> ups;
  torch::manual_seed(2);
  for (size_t k = 0; k < rows.size(); ++k) {
    shape[0] = rows[k];
    ups.push_back(FrameOf(torch::randn(shape), torch::randint(0, 10, {rows[k]}, at::kLong), 2));
  }
  auto run = [&](int64_t bucket_kib) {
    RunConfig c = testing::Fp32Config();
    c.group_bucket_kib = bucket_kib;
    std::vector<std::unique_ptr<ServerPart>> replicas(2);
    replicas[0] = testing::NewFp32Server(c);
    replicas[1] = testing::NewFp32Server(c);
    std::vector<std::string> digests(2);
    InGroup(2, [&](int rank, ReplicaGroup& group) {
      ServerPart& part = *replicas[rank];
      part.set_group(&group);
      for (int round = 0; round < 2; ++round) ThreeClientRound(rank, part, ups);
      EXPECT_EQ(part.updates(), 2);
      // With buckets the hooks started some during the backward passes (not all: the last
      // bucket holds the extras, added after).
      if (bucket_kib > 0) {
        EXPECT_GT(part.round_times().early_buckets, 0) << rank;
      }
      digests[rank] = part.WeightsDigest();
      part.set_group(nullptr);
    });
    EXPECT_EQ(digests[0], digests[1]) << "bucket_kib " << bucket_kib;
    return digests[0];
  };
  EXPECT_EQ(run(1), run(0));
}

}  // namespace
}  // namespace splitq::trainer
