#include "trainer/replica_group.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <torch/version.h>

#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "quant/torch_status.h"

namespace splitq::trainer {

namespace {
// PyTorch 2 split the collectives' implementations (Backend) from ProcessGroup; 1.13's
// ProcessGroupGloo is a ProcessGroup itself. Both offer the same allreduce and broadcast.
#if TORCH_VERSION_MAJOR >= 2
using Collectives = c10d::Backend;
#else
using Collectives = c10d::ProcessGroup;
#endif
// PyTorch 2.x records every collective in a process-wide "flight recorder" (on by default,
// TORCH_FR_BUFFER_SIZE=2000), and its recordWithResetEnabled() adds a new process group to a
// std::map before taking its own mutex: two groups of one process that start their first
// collectives at once race on that map (seen on PyTorch 2.11 as a SIGSEGV in
// std::_Rb_tree_insert_and_rebalance under ProcessGroupGloo::enqueue, 3 of 120 runs of these
// tests on a GPU host). A worker holds one group at a time, but `splitq bench allreduce` and
// the tests run several members as threads of one process. The recorder reads its size once,
// when it is first used, so it is turned off here before the first group is made, unless the
// user set a size (TORCH_FR_BUFFER_SIZE or its older name TORCH_NCCL_TRACE_BUFFER_SIZE, to
// debug a hang: then keep to one group per process). libtorch 1.13 has no recorder for Gloo and
// a recorder for NCCL that is off unless asked; the variable changes nothing there.
}  // namespace

void TurnOffFlightRecorderUnlessAsked() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (std::getenv("TORCH_FR_BUFFER_SIZE") == nullptr &&
        std::getenv("TORCH_NCCL_TRACE_BUFFER_SIZE") == nullptr) {
      setenv("TORCH_FR_BUFFER_SIZE", "0", 0);
    }
  });
}

struct ReplicaGroup::Impl {
  ReplicaGroupOptions o;
  at::Device device{at::kCPU};
  std::string backend;
  c10::intrusive_ptr<c10d::TCPStore> store;
  c10::intrusive_ptr<Collectives> pg;
  std::atomic<int64_t> latest{0};
  std::atomic<bool> broken{false};

  // Runs one collective; any failure is UNAVAILABLE (the group is broken).
  template <typename F>
  absl::Status Collective(const char* what, F&& body) {
    if (broken.load() && pg) {
      return absl::UnavailableError(absl::StrCat("replica group generation ", o.generation,
                                                 ", rank ", o.rank, ": broken, form the next"));
    }
    try {
      body();
      return absl::OkStatus();
    } catch (const std::exception& e) {
      broken.store(true);
      return absl::UnavailableError(absl::StrCat("replica group generation ", o.generation,
                                                 ", rank ", o.rank, ": ", what, ": ", e.what()));
    }
  }
};

ReplicaGroup::ReplicaGroup(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ReplicaGroup::~ReplicaGroup() = default;

absl::StatusOr<std::unique_ptr<ReplicaGroup>> ReplicaGroup::Create(
    const ReplicaGroupOptions& options, const at::Device& device,
    const std::function<void(int)>& on_store_port) {
  if (options.world < 1 || options.rank < 0 || options.rank >= options.world) {
    return absl::InvalidArgumentError(
        absl::StrCat("replica group: rank ", options.rank, " outside 0..", options.world - 1));
  }
  TurnOffFlightRecorderUnlessAsked();
  auto impl = std::make_unique<Impl>();
  impl->o = options;
  impl->device = device;
  impl->latest.store(options.generation);
  impl->backend =
      options.backend == "auto" ? (device.is_cuda() ? "nccl" : "gloo") : options.backend;
  if (impl->backend != "gloo" && impl->backend != "nccl") {
    return absl::InvalidArgumentError(
        absl::StrCat("replica group backend '", options.backend, "': auto, gloo or nccl"));
  }
  if (impl->backend == "nccl") {
#ifndef USE_C10D_NCCL
    return absl::FailedPreconditionError(
        "replica group backend nccl: this build has no NCCL (use gloo, or PyTorch's CUDA "
        "libtorch)");
#else
    if (!device.is_cuda()) {
      return absl::FailedPreconditionError("replica group backend nccl needs device cuda");
    }
    // A collective with a dead member must fail (after `timeout`) so the group can re-form,
    // not hang the stream or have the watchdog end the process (unless the user chose).
    setenv("TORCH_NCCL_BLOCKING_WAIT", "1", 0);
    setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0", 0);
#endif
  }
  Impl& s = *impl;
  absl::Status made = s.Collective("joining", [&] {
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(options.store_port);
    so.isServer = options.host_store;
    so.waitWorkers = false;
    so.timeout = options.timeout;
    s.store = c10::make_intrusive<c10d::TCPStore>(options.store_host, so);
    if (on_store_port) on_store_port(s.store->getPort());
    auto prefixed =
        c10::make_intrusive<c10d::PrefixStore>(absl::StrCat("g", options.generation), s.store);
    if (s.backend == "gloo") {
      auto go = c10d::ProcessGroupGloo::Options::create();
      go->devices.push_back(
          c10d::ProcessGroupGloo::createDeviceForHostname(options.interface_host));
      go->timeout = options.timeout;
      s.pg = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, options.rank, options.world, go);
    }
#ifdef USE_C10D_NCCL
    if (s.backend == "nccl") {
      auto no = c10d::ProcessGroupNCCL::Options::create();
      no->timeout = options.timeout;
      s.pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, options.rank, options.world, no);
    }
#endif
  });
  if (!made.ok()) return made;
  return std::unique_ptr<ReplicaGroup>(new ReplicaGroup(std::move(impl)));
}

absl::StatusOr<std::vector<int64_t>> ReplicaGroup::Max(const std::vector<int64_t>& values) {
  Impl& s = *impl_;
  // NCCL reduces device tensors only; doubles hold the values exactly (< 2^53).
  at::Tensor host = at::empty({static_cast<int64_t>(values.size())}, at::kDouble);
  for (size_t i = 0; i < values.size(); ++i) {
    host[static_cast<int64_t>(i)] = static_cast<double>(values[i]);
  }
  std::vector<at::Tensor> t{host.to(s.device)};
  c10d::AllreduceOptions ao;
  ao.reduceOp = c10d::ReduceOp::MAX;
  absl::Status st = s.Collective("maximum", [&] { s.pg->allreduce(t, ao)->wait(); });
  if (!st.ok()) return st;
  const at::Tensor back = t[0].to(at::kCPU);
  std::vector<int64_t> out(values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    out[i] = static_cast<int64_t>(back[static_cast<int64_t>(i)].item<double>());
  }
  return out;
}

absl::Status ReplicaGroup::SumInPlace(const std::vector<at::Tensor>& tensors) {
  // One flat buffer per dtype (one collective each), copied back after.
  std::unique_ptr<BucketedSum> sum = StartSum(tensors, 0);
  for (size_t i = 0; i < tensors.size(); ++i) sum->Add(i, tensors[i], 1.0);
  SPLITQ_RETURN_IF_ERROR(sum->Finish());
  for (size_t i = 0; i < tensors.size(); ++i) tensors[i].copy_(sum->sum(i));
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReplicaGroup::Broadcast(const std::string& bytes, int root) {
  Impl& s = *impl_;
  const auto on = at::TensorOptions().device(s.device);
  std::vector<at::Tensor> size{at::full(
      {1}, s.o.rank == root ? static_cast<int64_t>(bytes.size()) : 0, on.dtype(at::kLong))};
  c10d::BroadcastOptions bo;
  bo.rootRank = root;
  absl::Status st = s.Collective("broadcast size", [&] { s.pg->broadcast(size, bo)->wait(); });
  if (!st.ok()) return st;
  const int64_t n = size[0].item<int64_t>();
  std::vector<at::Tensor> data{at::empty({n}, on.dtype(at::kByte))};
  if (s.o.rank == root && n > 0) {
    data[0].copy_(at::from_blob(const_cast<char*>(bytes.data()), {n}, at::kByte));
  }
  st = s.Collective("broadcast", [&] { s.pg->broadcast(data, bo)->wait(); });
  if (!st.ok()) return st;
  const at::Tensor host = data[0].to(at::kCPU).contiguous();
  return std::string(static_cast<const char*>(host.data_ptr()), static_cast<size_t>(n));
}

namespace {
using WorkPtr = decltype(std::declval<Collectives&>().allreduce(
    std::declval<std::vector<at::Tensor>&>(), c10d::AllreduceOptions()));
}  // namespace

struct BucketedSum::Impl {
  ReplicaGroup::Impl* group = nullptr;
  struct Place {
    size_t bucket = 0;
    int64_t offset = 0, numel = 0;
    std::vector<int64_t> shape;
    bool added = false;
  };
  struct Bucket {
    std::vector<size_t> places;
    at::Tensor flat;
    int missing = 0;  // places not added yet
    bool started = false;
    WorkPtr work;
  };
  std::vector<Place> places;
  std::vector<Bucket> buckets;
  size_t next = 0;  // the first bucket not started
  int early = 0;
  absl::Status failed;
  bool late = false;      // an Add came for a started bucket
  bool finished = false;  // Finish ran
  std::mutex mutex;

  at::Tensor Slot(const Place& p) const {
    return buckets[p.bucket].flat.narrow(0, p.offset, p.numel).view(p.shape);
  }
  // Starts bucket `b` (places never added hold zeros); the caller holds `mutex`.
  void Start(Bucket& b) {
    b.started = true;
    for (size_t i : b.places) {
      if (!places[i].added) Slot(places[i]).zero_();
    }
    if (!failed.ok()) return;
    failed = group->Collective("gradient sum", [&] {
      std::vector<at::Tensor> t{b.flat};
      b.work = group->pg->allreduce(t, c10d::AllreduceOptions());
    });
  }
};

BucketedSum::BucketedSum(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
BucketedSum::~BucketedSum() {
  // A sum dropped unfinished (an error on the way): its remaining collectives still start (the
  // other members wait for them), and none may be left reading freed buckets.
  if (!impl_->finished) (void)Finish();
  for (auto& b : impl_->buckets) {
    if (b.work) {
      try {
        b.work->wait();
      } catch (const std::exception&) {
      }
    }
  }
}

std::unique_ptr<BucketedSum> ReplicaGroup::StartSum(const std::vector<at::Tensor>& like,
                                                    int64_t bucket_bytes) {
  auto impl = std::make_unique<BucketedSum::Impl>();
  impl->group = impl_.get();
  impl->places.resize(like.size());
  std::vector<int64_t> sizes;  // each bucket's elements
  std::vector<at::ScalarType> types;
  for (size_t k = like.size(); k-- > 0;) {
    const at::Tensor& t = like[k];
    const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
    const bool fits =
        !types.empty() && types.back() == t.scalar_type() &&
        (bucket_bytes <= 0 ||
         (sizes.back() * static_cast<int64_t>(t.element_size()) + bytes <= bucket_bytes));
    if (!fits) {
      impl->buckets.emplace_back();
      sizes.push_back(0);
      types.push_back(t.scalar_type());
    }
    BucketedSum::Impl::Place& p = impl->places[k];
    p.bucket = impl->buckets.size() - 1;
    p.offset = sizes.back();
    p.numel = t.numel();
    p.shape = t.sizes().vec();
    sizes.back() += t.numel();
    impl->buckets.back().places.push_back(k);
    impl->buckets.back().missing += 1;
  }
  for (size_t b = 0; b < impl->buckets.size(); ++b) {
    impl->buckets[b].flat =
        at::empty({sizes[b]}, at::TensorOptions().dtype(types[b]).device(impl_->device));
  }
  return std::unique_ptr<BucketedSum>(new BucketedSum(std::move(impl)));
}

void BucketedSum::Add(size_t index, const at::Tensor& value, double scale) {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.mutex);
  if (index >= s.places.size()) return;
  Impl::Place& p = s.places[index];
  Impl::Bucket& b = s.buckets[p.bucket];
  if (b.started) {
    s.late = true;  // not in the sum: the caller poisons the round (every member's collectives
    return;         // still run, so none waits for one this member skipped)
  }
  at::Tensor slot = s.Slot(p);
  if (p.added) {
    slot.add_(value, scale);
    return;
  }
  slot.copy_(value);
  if (scale != 1.0) slot.mul_(scale);
  p.added = true;
  b.missing -= 1;
  while (s.next < s.buckets.size() && s.buckets[s.next].missing == 0) {
    s.Start(s.buckets[s.next++]);
    ++s.early;
  }
}

bool BucketedSum::Discard() {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.mutex);
  for (size_t b = s.next; b < s.buckets.size(); ++b) {
    for (size_t i : s.buckets[b].places) s.places[i].added = false;
    s.buckets[b].missing = static_cast<int>(s.buckets[b].places.size());
  }
  return s.next > 0;
}

absl::Status BucketedSum::Finish() {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.mutex);
  s.finished = true;
  while (s.next < s.buckets.size()) s.Start(s.buckets[s.next++]);
  for (auto& b : s.buckets) {
    if (!b.work) continue;
    try {
      b.work->wait();
    } catch (const std::exception& e) {
      if (s.failed.ok()) {
        s.failed = absl::UnavailableError(
            absl::StrCat("replica group generation ", s.group->o.generation, ", rank ",
                         s.group->o.rank, ": gradient sum: ", e.what()));
      }
    }
    b.work.reset();
  }
  if (!s.failed.ok()) s.group->broken.store(true);
  return s.failed;
}

at::Tensor BucketedSum::sum(size_t index) const { return impl_->Slot(impl_->places[index]); }
bool BucketedSum::added(size_t index) const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return index < impl_->places.size() && impl_->places[index].added;
}
bool BucketedSum::late() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->late;
}
int BucketedSum::buckets() const { return static_cast<int>(impl_->buckets.size()); }
int BucketedSum::started_early() const { return impl_->early; }

int64_t ReplicaGroup::generation() const { return impl_->o.generation; }
void ReplicaGroup::set_latest_generation(int64_t generation) { impl_->latest.store(generation); }
int64_t ReplicaGroup::latest_generation() const { return impl_->latest.load(); }
bool ReplicaGroup::broken() const { return impl_->broken.load(); }
void ReplicaGroup::MarkBroken() { impl_->broken.store(true); }

struct GroupStore::Impl {
  c10::intrusive_ptr<c10d::TCPStore> store;
};

GroupStore::GroupStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GroupStore::~GroupStore() = default;

absl::StatusOr<std::unique_ptr<GroupStore>> GroupStore::Start(const std::string& host, int port,
                                                              std::chrono::milliseconds timeout) {
  auto impl = std::make_unique<Impl>();
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(port);
    so.isServer = true;
    so.waitWorkers = false;
    so.timeout = timeout;
    impl->store = c10::make_intrusive<c10d::TCPStore>(host, so);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("worker group store on ", host, ":", port, ": ", e.what()));
  }
  return std::unique_ptr<GroupStore>(new GroupStore(std::move(impl)));
}

int GroupStore::port() const { return impl_->store->getPort(); }

int ReplicaGroup::rank() const { return impl_->o.rank; }
int ReplicaGroup::world() const { return impl_->o.world; }
std::string ReplicaGroup::backend() const { return impl_->backend; }
int ReplicaGroup::store_port() const { return impl_->store ? impl_->store->getPort() : 0; }

}  // namespace splitq::trainer
