#include "tools/coordinator_bench.h"

#include <dirent.h>
#include <grpcpp/grpcpp.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/files.h"
#include "base/memory.h"
#include "proto/rpc_channel.h"
#include "server/coordinator_core.h"
#include "server/tokens.h"
#include "splitq/v1/coordinator.grpc.pb.h"

extern char** environ;

namespace splitq::tools {
namespace {

using Clock = std::chrono::steady_clock;
namespace v1 = splitq::v1;

// The coordinator child: spawned, found through its ready file, stopped with SIGTERM.
class Child {
 public:
  ~Child() { Stop(); }
  absl::Status Start(const std::string& binary, const std::vector<std::string>& args,
                     const std::string& ready_file) {
    std::vector<char*> argv;
    argv.push_back(const_cast<char*>(binary.c_str()));
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    if (const int e = posix_spawn(&pid_, binary.c_str(), nullptr, nullptr, argv.data(), environ);
        e != 0) {
      pid_ = 0;
      return absl::InternalError(absl::StrCat("cannot start ", binary, ": ", std::strerror(e)));
    }
    for (int i = 0; i < 600; ++i) {
      std::ifstream in(ready_file);
      std::string address;
      if (in >> address && !address.empty()) {
        address_ = address;
        return absl::OkStatus();
      }
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = 0;
        return absl::InternalError("the coordinator exited before it was ready (see its log)");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return absl::DeadlineExceededError("the coordinator was not ready within 30 s");
  }
  void Stop() {
    if (pid_ <= 0) return;
    kill(pid_, SIGTERM);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = 0;
  }
  // utime + stime, seconds.
  double CpuSeconds() const {
    std::ifstream in(absl::StrCat("/proc/", pid_, "/stat"));
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const size_t close = text.rfind(')');
    if (close == std::string::npos) return 0;
    std::istringstream fields(text.substr(close + 2));
    std::string field;
    double ticks = 0;
    for (int i = 3; i <= 15 && fields >> field; ++i) {
      if (i == 14 || i == 15) ticks += std::stod(field);
    }
    return ticks / static_cast<double>(sysconf(_SC_CLK_TCK));
  }
  double RssMb() const { return base::RssMiB(pid_); }
  const std::string& address() const { return address_; }
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = 0;
  std::string address_;
};

// Runs calls 0, 1, 2, ... until `count` (0: no limit) or `seconds` (0: no limit), at most
// `window` in flight, paced to `rate` calls/s when rate > 0. `issue(i, done)` starts call i and
// calls done(kind, ok) once (from any thread) when it is over.
struct Load {
  uint64_t calls = 0, errors = 0;
  double seconds = 0;
  std::vector<std::vector<uint32_t>> latency_us;  // per kind
  // Per 100 ms of the phase (by issue time): calls issued, and those slower than kSlow.
  std::vector<uint32_t> issued_by_window, slow_by_window;
  std::string first_error;
};
constexpr std::chrono::milliseconds kWindow{100};
constexpr std::chrono::milliseconds kSlow{5};
using Done = std::function<void(int kind, const grpc::Status& status)>;
using Issue = std::function<void(uint64_t i, Done done)>;

// One issuing thread: calls first, first + stride, ... below `count`.
Load DriveOne(int kinds, int window, uint64_t first, uint64_t stride, uint64_t count,
              double seconds, double rate, const Issue& issue) {
  std::mutex mutex;
  std::condition_variable cv;
  int in_flight = 0;
  Load load;
  load.latency_us.resize(static_cast<size_t>(kinds));
  const Clock::time_point start = Clock::now();
  for (uint64_t i = first, n = 0;; i += stride, ++n) {
    const Clock::time_point now = Clock::now();
    if ((count > 0 && i >= count) ||
        (seconds > 0 && now - start >= std::chrono::duration<double>(seconds))) {
      break;
    }
    if (rate > 0) {
      const auto due = start + std::chrono::duration_cast<Clock::duration>(
                                   std::chrono::duration<double>(static_cast<double>(n) / rate));
      if (due > now + std::chrono::microseconds(200)) std::this_thread::sleep_until(due);
    }
    {
      std::unique_lock<std::mutex> lock(mutex);
      cv.wait(lock, [&] { return in_flight < window; });
      ++in_flight;
    }
    const Clock::time_point t0 = Clock::now();
    issue(i, [&, t0](int kind, const grpc::Status& status) {
      const auto us = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t0);
      std::lock_guard<std::mutex> lock(mutex);
      load.latency_us[static_cast<size_t>(kind)].push_back(static_cast<uint32_t>(us.count()));
      const size_t w = static_cast<size_t>((t0 - start) / kWindow);
      if (load.issued_by_window.size() <= w) {
        load.issued_by_window.resize(w + 1);
        load.slow_by_window.resize(w + 1);
      }
      ++load.issued_by_window[w];
      if (us >= kSlow) ++load.slow_by_window[w];
      ++load.calls;
      if (!status.ok()) {
        if (load.errors++ == 0) {
          load.first_error = absl::StrCat(status.error_code(), ": ", status.error_message());
        }
      }
      --in_flight;
      cv.notify_one();
    });
  }
  std::unique_lock<std::mutex> lock(mutex);
  cv.wait(lock, [&] { return in_flight == 0; });
  load.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return load;
}

// `threads` issuing threads, each with its share of the window and the rate; one Load.
Load Drive(int threads, int kinds, int window, uint64_t count, double seconds, double rate,
           const Issue& issue) {
  if (threads <= 1) return DriveOne(kinds, window, 0, 1, count, seconds, rate, issue);
  std::vector<Load> loads(static_cast<size_t>(threads));
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      loads[static_cast<size_t>(t)] =
          DriveOne(kinds, std::max(1, window / threads), static_cast<uint64_t>(t),
                   static_cast<uint64_t>(threads), count, seconds, rate / threads, issue);
    });
  }
  for (std::thread& w : workers) w.join();
  Load all;
  all.latency_us.resize(static_cast<size_t>(kinds));
  for (Load& l : loads) {
    all.calls += l.calls;
    if (all.errors == 0) all.first_error = l.first_error;
    all.errors += l.errors;
    all.seconds = std::max(all.seconds, l.seconds);
    if (all.issued_by_window.size() < l.issued_by_window.size()) {
      all.issued_by_window.resize(l.issued_by_window.size());
      all.slow_by_window.resize(l.issued_by_window.size());
    }
    for (size_t w = 0; w < l.issued_by_window.size(); ++w) {
      all.issued_by_window[w] += l.issued_by_window[w];
      all.slow_by_window[w] += l.slow_by_window[w];
    }
    for (size_t k = 0; k < l.latency_us.size(); ++k) {
      all.latency_us[k].insert(all.latency_us[k].end(), l.latency_us[k].begin(),
                               l.latency_us[k].end());
    }
  }
  return all;
}

double Percentile(std::vector<uint32_t>& v, double q) {
  if (v.empty()) return 0;
  const size_t k = std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())));
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(k), v.end());
  return v[k];
}

// One async unary call with a bearer token; `then(status, reply)` runs when it completes.
template <class Request, class Reply>
struct Call {
  grpc::ClientContext context;
  Request request;
  Reply reply;
};

template <class Request, class Reply, class Method, class Then>
void Start(const std::string& token, Request request, Method method, Then then) {
  auto* call = new Call<Request, Reply>;
  call->request = std::move(request);
  rpc::AddBearer(call->context, token);
  call->context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  method(&call->context, &call->request, &call->reply,
         [call, then = std::move(then)](grpc::Status status) mutable {
           then(status, call->reply);
           delete call;
         });
}

// The registry alone (server/coordinator_core.h, no gRPC, one thread): wall time per call.
std::vector<CoordinatorBenchRow> CoreRows(const CoordinatorBenchOptions& o) {
  using server::CoordinatorCore;
  using server::Role;
  const Clock::time_point t0 = Clock::now();
  CoordinatorCore core(server::CoordinatorOptions{
      std::chrono::milliseconds(o.heartbeat_ms), std::chrono::milliseconds(2 * o.heartbeat_ms),
      static_cast<uint32_t>(2 * (o.members / o.workers + 1)),
      std::chrono::seconds(o.forget_after_s)});
  std::vector<CoordinatorBenchRow> rows;
  const auto row = [&](const std::string& phase, uint64_t calls, Clock::time_point start) {
    CoordinatorBenchRow r;
    r.phase = phase;
    r.calls = calls;
    r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    r.server_cpu_us_per_call = calls > 0 ? r.seconds * 1e6 / static_cast<double>(calls) : 0;
    const server::CoordinatorTotals totals = core.Totals();
    r.live = totals.workers + totals.clients;
    r.records = totals.records;
    rows.push_back(r);
  };
  std::vector<uint64_t> ids(static_cast<size_t>(o.members));
  std::vector<std::string> worker_of(static_cast<size_t>(o.members));
  Clock::time_point start = Clock::now();
  for (int m = 0; m < o.members; ++m) {
    const bool worker = m < o.workers;
    auto id = core.Register(worker ? Role::kWorker : Role::kClient,
                            absl::StrCat(worker ? "w" : "c", m), server::kProtocolVersion,
                            {"127.0.0.1", static_cast<uint32_t>(10000 + m)}, 0, t0);
    ids[static_cast<size_t>(m)] = id.ok() ? *id : 0;
  }
  row("core register", static_cast<uint64_t>(o.members), start);
  start = Clock::now();
  for (int m = o.workers; m < o.members; ++m) {
    auto a = core.Assign(ids[static_cast<size_t>(m)], t0);
    if (a.ok()) worker_of[static_cast<size_t>(m)] = a->worker_name;
  }
  row("core assign (pick)", static_cast<uint64_t>(o.members - o.workers), start);
  start = Clock::now();
  const uint64_t beats = 10 * static_cast<uint64_t>(o.members);
  for (uint64_t i = 0; i < beats; ++i) {
    (void)core.Heartbeat(ids[i % static_cast<uint64_t>(o.members)], i, t0);
  }
  row("core heartbeat", beats, start);
  start = Clock::now();
  for (int m = o.workers; m < o.members; ++m) {
    auto a = core.Assign(ids[static_cast<size_t>(m)], t0, "", worker_of[static_cast<size_t>(m)]);
    if (a.ok()) worker_of[static_cast<size_t>(m)] = a->worker_name;
  }
  row("core assign (move)", static_cast<uint64_t>(o.members - o.workers), start);
  start = Clock::now();
  const size_t listed = core.Status(t0).size();
  row("core status (all)", listed, start);
  start = Clock::now();
  const size_t dead = core.Expire(t0 + std::chrono::milliseconds(2 * o.heartbeat_ms + 1)).size();
  row("core expire (all)", dead, start);
  return rows;
}

// Every thread listed in `task_dir` (/proc/PID/task) onto `cpus`.
void PinThreads(const std::string& task_dir, const cpu_set_t& cpus) {
  DIR* d = opendir(task_dir.c_str());
  if (d == nullptr) return;
  while (const dirent* e = readdir(d)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    sched_setaffinity(static_cast<pid_t>(std::atoi(e->d_name)), sizeof(cpus), &cpus);
  }
  closedir(d);
}

class Bench {
 public:
  explicit Bench(const CoordinatorBenchOptions& o) : o_(o) {}

  absl::StatusOr<std::vector<CoordinatorBenchRow>> Run() {
    if (o_.members < 2 || o_.workers < 1 || o_.workers >= o_.members) {
      return absl::InvalidArgumentError("members >= 2 and 1 <= workers < members");
    }
    // POSIX calls and base::RemoveTree, not std::filesystem: in a binary that links PyTorch's
    // libtorch, std::filesystem may bind to libtorch.so's own copy (base/files.h), and
    // remove_all crashed there on the GPU host.
    const char* tmp = std::getenv("TMPDIR");
    const std::string dir = absl::StrCat(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp",
                                         "/splitq-coordbench-", getpid());
    if (mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
      return absl::InternalError(absl::StrCat(dir, ": ", std::strerror(errno)));
    }
    struct Cleanup {
      std::string dir;
      ~Cleanup() { base::RemoveTree(dir); }
    } cleanup{dir};
    Progress(absl::StrCat("making ", o_.members + o_.churn_pool, " tokens"));
    std::string file = "# splitq bench coordinator\n";
    const int total = o_.members + o_.churn_pool;
    names_.resize(static_cast<size_t>(total));
    tokens_.resize(static_cast<size_t>(total));
    ids_ = std::make_unique<std::atomic<uint64_t>[]>(static_cast<size_t>(total));
    for (int i = 0; i < total; ++i) {
      names_[i] = i < o_.workers   ? absl::StrCat("w", i)
                  : i < o_.members ? absl::StrCat("c", i)
                                   : absl::StrCat("x", i);
      absl::StatusOr<std::string> token = server::MakeToken();
      if (!token.ok()) return token.status();
      tokens_[i] = *token;
      absl::StrAppend(&file, names_[i], " ", tokens_[i],
                      i < o_.workers ? " worker\n" : " client\n");
    }
    const std::string tokens_path = dir + "/tokens", config_path = dir + "/config.yaml",
                      ready_path = dir + "/ready";
    if (absl::Status s = base::WriteFileAtomically(tokens_path, file, 0600); !s.ok()) return s;
    if (absl::Status s = base::WriteFileAtomically(config_path, "task: fmnist\n", 0600); !s.ok()) {
      return s;
    }
    std::string binary = o_.splitq;
    if (binary.empty()) {
      char self[4096];
      const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
      if (n <= 0) return absl::InternalError("cannot read /proc/self/exe");
      binary.assign(self, static_cast<size_t>(n));
    }
    // With --coordinator-cpus the child starts on its CPUs (it inherits this thread's mask),
    // so that gRPC sizes its thread pools for them (cli/grpc_cpus.cc); the threads are pinned
    // again below, and this process moves to the other CPUs.
    const unsigned all_cpus = std::thread::hardware_concurrency();
    const unsigned k_cpus = static_cast<unsigned>(std::max(o_.coordinator_cpus, 0));
    if (k_cpus > 0 && k_cpus >= all_cpus) {
      return absl::FailedPreconditionError(absl::StrCat("--coordinator-cpus ", k_cpus,
                                                        " leaves none of this machine's ", all_cpus,
                                                        " CPUs to the generator"));
    }
    cpu_set_t coordinator_set, generator_set;
    CPU_ZERO(&coordinator_set);
    CPU_ZERO(&generator_set);
    for (unsigned c = 0; c < all_cpus; ++c)
      CPU_SET(c, c < k_cpus ? &coordinator_set : &generator_set);
    if (k_cpus > 0) sched_setaffinity(0, sizeof(coordinator_set), &coordinator_set);
    if (absl::Status s = child_.Start(
            binary,
            {"coordinator", "--config", config_path, "--listen", "127.0.0.1:0", "--insecure",
             "--tokens", tokens_path, "--heartbeat-ms", std::to_string(o_.heartbeat_ms),
             "--forget-after-s", std::to_string(o_.forget_after_s), "--ready-file", ready_path,
             // Every generator connection comes from 127.0.0.1, up to a window's worth at once
             // before their first call: the per-address cap is for real peers.
             "--max-pending-per-address", "0", "--grpc-memory-mib",
             std::to_string(std::max(o_.grpc_memory_mib, 0)), "--log-level", "warn"},
            ready_path);
        !s.ok()) {
      if (k_cpus > 0) {
        cpu_set_t all;
        CPU_ZERO(&all);
        for (unsigned c = 0; c < all_cpus; ++c) CPU_SET(c, &all);
        sched_setaffinity(0, sizeof(all), &all);
      }
      return s;
    }
    if (k_cpus > 0) {
      // Every thread of the child (gRPC's too): through /proc/PID/task.
      PinThreads(absl::StrCat("/proc/", child_.pid(), "/task"), coordinator_set);
      PinThreads("/proc/self/task", generator_set);
    }
    {
      int threads = 0;
      if (DIR* d = opendir(absl::StrCat("/proc/", child_.pid(), "/task").c_str())) {
        while (const dirent* e = readdir(d)) threads += e->d_name[0] >= '0' && e->d_name[0] <= '9';
        closedir(d);
      }
      Progress(absl::StrCat("the coordinator runs ", threads, " threads once it is ready"));
    }
    for (int c = 0; c < o_.channels; ++c) {
      grpc::ChannelArguments args;
      args.SetInt("splitq.bench.channel", c);  // a connection of its own
      stubs_.push_back(v1::Coordinator::NewStub(
          grpc::CreateCustomChannel(child_.address(), grpc::InsecureChannelCredentials(), args)));
    }
    worker_of_.resize(static_cast<size_t>(o_.members));
    busy_ = std::make_unique<std::atomic<bool>[]>(static_cast<size_t>(o_.churn_pool));
    Progress("the registry alone, in this process");
    for (const CoordinatorBenchRow& r : CoreRows(o_)) {
      rows_.push_back(r);
      Progress(absl::StrFormat("%-20s %8d calls  %.2f us each", r.phase, r.calls,
                               r.server_cpu_us_per_call));
    }
    RegisterPhase();
    AssignPhase();
    HeartbeatPhase("heartbeat", 0, 0);
    HeartbeatPhase(absl::StrCat("heartbeat@", o_.rate), o_.rate, 0);
    HeartbeatPhase(absl::StrCat("mix@", o_.rate), o_.rate, 20);
    StatusPhase();
    ChurnPhase();
    if (o_.connections > 0) ConnectionsPhase();
    if (o_.expire) ExpirePhase();
    child_.Stop();
    return rows_;
  }

 private:
  void Progress(const std::string& line) const {
    if (o_.progress) o_.progress(line);
  }
  v1::Coordinator::Stub& Stub(uint64_t i) { return *stubs_[i % stubs_.size()]; }

  // A progress line naming the 100 ms windows of the phase whose calls were slow (over kSlow),
  // so that a periodic stall shows its period (when under 10% of the calls were slow).
  void SlowWindows(const Load& load) const {
    std::string line;
    uint64_t slow = 0;
    int shown = 0;
    for (size_t w = 0; w < load.slow_by_window.size(); ++w) {
      if (load.slow_by_window[w] == 0) continue;
      slow += load.slow_by_window[w];
      if (shown++ < 40) {
        absl::StrAppend(&line, absl::StrFormat(" %.1fs:%d/%d", 0.1 * static_cast<double>(w),
                                               load.slow_by_window[w], load.issued_by_window[w]));
      }
    }
    // Only a tail: in a saturated phase most calls queue, and the windows say nothing.
    if (slow == 0 || slow * 10 > load.calls) return;
    Progress(absl::StrCat("  ", slow, " calls over ", kSlow.count(),
                          " ms, by the 100 ms window they were issued in (slow/issued):", line,
                          shown > 40 ? absl::StrCat(" and ", shown - 40, " more windows") : ""));
  }

  // Appends the rows of one phase: kind k of `load` as `names[k]`.
  void Rows(const std::vector<std::string>& names, Load& load, double cpu0, uint64_t extra = 0) {
    const double cpu = child_.CpuSeconds() - cpu0;
    v1::StatusReply totals = Totals();
    for (size_t k = 0; k < names.size(); ++k) {
      std::vector<uint32_t>& l = load.latency_us[k];
      CoordinatorBenchRow r;
      r.phase = names[k];
      r.calls = l.size();
      r.errors = k == 0 ? load.errors : 0;
      if (k == 0) r.first_error = load.first_error;
      r.seconds = load.seconds;
      r.p50_us = Percentile(l, 0.5);
      r.p99_us = Percentile(l, 0.99);
      r.p999_us = Percentile(l, 0.999);
      r.max_us = l.empty() ? 0 : *std::max_element(l.begin(), l.end());
      r.server_cpu_us_per_call =
          load.calls + extra > 0 ? cpu * 1e6 / static_cast<double>(load.calls + extra) : 0;
      r.rss_mb = child_.RssMb();
      r.live = totals.live_workers() + totals.live_clients();
      r.records = totals.records();
      rows_.push_back(r);
      Progress(absl::StrFormat(
          "%-16s %8d calls %9.0f/s  p50 %6.0f us  p99 %7.0f us  "
          "%5.1f us CPU/call  RSS %5.0f MB  live %d  records %d%s",
          r.phase, r.calls, r.calls_per_s(), r.p50_us, r.p99_us, r.server_cpu_us_per_call, r.rss_mb,
          r.live, r.records,
          load.errors > 0 && k == 0
              ? absl::StrCat("  (", load.errors, " errors, first ", load.first_error, ")")
              : ""));
    }
    SlowWindows(load);
  }

  v1::StatusReply Totals() {
    grpc::ClientContext context;
    rpc::AddBearer(context, tokens_[0]);
    v1::StatusRequest request;
    request.set_limit(1);
    v1::StatusReply reply;
    (void)stubs_[0]->Status(&context, request, &reply);
    return reply;
  }

  void Register(int m, uint64_t lane, const Done& done) {
    v1::RegisterRequest r;
    r.set_protocol_version(v1::PROTOCOL_VERSION_CURRENT);
    r.set_role(m < o_.workers ? v1::ROLE_WORKER : v1::ROLE_CLIENT);
    r.set_name(names_[m]);
    if (m < o_.workers) {
      r.mutable_endpoint()->set_host("127.0.0.1");
      r.mutable_endpoint()->set_port(static_cast<uint32_t>(10000 + m));
      // Room for twice an even share, so that moves in the mix phase find some.
      r.set_max_sessions(static_cast<uint32_t>(2 * (o_.members / o_.workers + 1)));
    }
    v1::Coordinator::Stub& stub = Stub(lane);
    Start<v1::RegisterRequest, v1::RegisterReply>(
        tokens_[m], std::move(r),
        [&stub](auto* c, auto* q, auto* p, auto cb) { stub.async()->Register(c, q, p, cb); },
        [this, m, done](const grpc::Status& s, const v1::RegisterReply& reply) {
          if (s.ok()) ids_[m].store(reply.member_id());
          done(0, s);
        });
  }

  void Heartbeat(int m, uint64_t lane, int kind, const Done& done) {
    v1::HeartbeatRequest r;
    r.set_member_id(ids_[m].load());
    r.set_step(lane);
    v1::Coordinator::Stub& stub = Stub(lane);
    Start<v1::HeartbeatRequest, v1::HeartbeatReply>(
        tokens_[m], std::move(r),
        [&stub](auto* c, auto* q, auto* p, auto cb) { stub.async()->Heartbeat(c, q, p, cb); },
        [kind, done](const grpc::Status& s, const v1::HeartbeatReply& reply) {
          done(kind, s.ok() && reply.unknown_member()
                         ? grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown member")
                         : s);
        });
  }

  void Assign(int m, uint64_t lane, int kind, bool move, const Done& done) {
    v1::AssignRequest r;
    r.set_member_id(ids_[m].load());
    if (move) {
      std::lock_guard<std::mutex> lock(worker_of_mutex_);
      r.set_unreachable_worker(worker_of_[m]);
    }
    v1::Coordinator::Stub& stub = Stub(lane);
    Start<v1::AssignRequest, v1::AssignReply>(
        tokens_[m], std::move(r),
        [&stub](auto* c, auto* q, auto* p, auto cb) { stub.async()->Assign(c, q, p, cb); },
        [this, m, kind, done](const grpc::Status& s, const v1::AssignReply& reply) {
          if (s.ok()) {
            std::lock_guard<std::mutex> lock(worker_of_mutex_);
            worker_of_[m] = reply.worker_name();
          }
          done(kind, s);
        });
  }

  void RegisterPhase() {
    const int slices = 10;
    for (int k = 0; k < slices; ++k) {
      const int begin = o_.members * k / slices, end = o_.members * (k + 1) / slices;
      const double cpu0 = child_.CpuSeconds();
      Load load =
          Drive(o_.generator_threads, 1, o_.window, static_cast<uint64_t>(end - begin), 0, 0,
                [&](uint64_t i, Done done) { Register(begin + static_cast<int>(i), i, done); });
      const auto count = [](int n) {
        return n % 1000 == 0 ? absl::StrCat(n / 1000, "k") : absl::StrCat(n);
      };
      Rows({absl::StrCat("register ", count(begin), "-", count(end))}, load, cpu0);
    }
  }

  void AssignPhase() {
    const int clients = o_.members - o_.workers;
    const double cpu0 = child_.CpuSeconds();
    Load load = Drive(o_.generator_threads, 1, o_.window, static_cast<uint64_t>(clients), 0, 0,
                      [&](uint64_t i, Done done) {
                        Assign(o_.workers + static_cast<int>(i), i, 0, false, done);
                      });
    Rows({"assign (pick)"}, load, cpu0);
  }

  // Heartbeats round robin over every member; with `assign_every` > 0, each such call is an
  // Assign of a client that names its worker unreachable.
  void HeartbeatPhase(const std::string& name, int rate, int assign_every) {
    const int clients = o_.members - o_.workers;
    const double cpu0 = child_.CpuSeconds();
    Load load =
        Drive(o_.generator_threads, 2, o_.window, 0, o_.seconds, rate, [&](uint64_t i, Done done) {
          if (assign_every > 0 && i % static_cast<uint64_t>(assign_every) == 0) {
            const int client = o_.workers + static_cast<int>((i / assign_every) % clients);
            Assign(client, i, 1, true, done);
          } else {
            Heartbeat(static_cast<int>(i % static_cast<uint64_t>(o_.members)), i, 0, done);
          }
        });
    if (assign_every > 0) {
      Rows({name + " heartbeat", name + " assign (move)"}, load, cpu0);
    } else {
      Rows({name}, load, cpu0);
    }
  }

  // Full listings, pages of 10,000, on a thread of their own while heartbeats run at the rate.
  void StatusPhase() {
    std::atomic<bool> done{false};
    std::vector<uint32_t> listings_ms;
    uint64_t pages = 0;
    std::thread lister([&] {
      while (!done.load()) {
        const Clock::time_point t0 = Clock::now();
        uint64_t page = 0;
        do {
          grpc::ClientContext context;
          rpc::AddBearer(context, tokens_[0]);
          v1::StatusRequest request;
          request.set_page(page);
          request.set_limit(10000);
          v1::StatusReply reply;
          if (!stubs_[0]->Status(&context, request, &reply).ok()) return;
          page = reply.next_page();
          ++pages;
        } while (page != 0);
        listings_ms.push_back(static_cast<uint32_t>(
            std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0).count()));
      }
    });
    const double cpu0 = child_.CpuSeconds();
    Load load =
        Drive(o_.generator_threads, 1, o_.window, 0, o_.seconds, o_.rate, [&](uint64_t i, Done d) {
          Heartbeat(static_cast<int>(i % static_cast<uint64_t>(o_.members)), i, 0, d);
        });
    done.store(true);
    lister.join();
    Rows({absl::StrCat("status@", o_.rate, " heartbeat")}, load, cpu0, pages);
    CoordinatorBenchRow r;
    r.phase = "status listing";
    r.calls = listings_ms.size();
    r.seconds = load.seconds;
    for (uint32_t& ms : listings_ms) ms *= 1000;  // as microseconds, like every row
    r.p50_us = Percentile(listings_ms, 0.5);
    r.p99_us = Percentile(listings_ms, 0.99);
    r.max_us = listings_ms.empty() ? 0 : *std::max_element(listings_ms.begin(), listings_ms.end());
    r.rss_mb = child_.RssMb();
    rows_.push_back(r);
    Progress(
        absl::StrFormat("status listing: %d full listings of %d members (%d pages), "
                        "p50 %.0f ms, max %.0f ms",
                        r.calls, o_.members, pages, r.p50_us / 1000, r.max_us / 1000));
  }

  // Pool members leave and register again (one chain per cycle) while heartbeats run.
  void ChurnPhase() {
    for (int half = 0; half < 2; ++half) {
      const double cpu0 = child_.CpuSeconds();
      Load load =
          Drive(o_.generator_threads, 2, o_.window, 0, o_.seconds, 0, [&](uint64_t i, Done done) {
            if (i % 2 == 0) {
              Heartbeat(static_cast<int>((i / 2) % static_cast<uint64_t>(o_.members)), i, 0, done);
              return;
            }
            const uint64_t k = cycle_++ % static_cast<uint64_t>(o_.churn_pool);
            if (busy_[k].exchange(true)) {  // its last cycle is still out: a heartbeat instead
              Heartbeat(static_cast<int>((i / 2) % static_cast<uint64_t>(o_.members)), i, 0, done);
              return;
            }
            const int m = o_.members + static_cast<int>(k);
            const Done over = [this, k, done](int kind, const grpc::Status& s) {
              busy_[k].store(false);
              done(kind, s);
            };
            // Register (again), then leave: one cycle, latency of both.
            Register(m, i, [this, m, i, done = over](int, const grpc::Status& s) {
              if (!s.ok()) return done(1, s);
              v1::LeaveRequest r;
              r.set_member_id(ids_[m].load());
              v1::Coordinator::Stub& stub = Stub(i);
              Start<v1::LeaveRequest, v1::LeaveReply>(
                  tokens_[m], std::move(r),
                  [&stub](auto* c, auto* q, auto* p, auto cb) { stub.async()->Leave(c, q, p, cb); },
                  [done](const grpc::Status& left, const v1::LeaveReply&) { done(1, left); });
            });
          });
      const uint64_t cycles = load.latency_us[1].size();
      Rows({absl::StrCat("churn ", half + 1, "/2 heartbeat"),
            absl::StrCat("churn ", half + 1, "/2 join+leave")},
           load, cpu0, cycles);
    }
  }

  // `connections` members each heartbeat once over a connection of its own; then the
  // connections close. The coordinator's RSS before, with them open, and a heartbeat period and
  // 2 s after they closed.
  void ConnectionsPhase() {
    const double rss0 = child_.RssMb();
    const double cpu0 = child_.CpuSeconds();
    std::vector<std::unique_ptr<v1::Coordinator::Stub>> own;
    for (int c = 0; c < o_.connections; ++c) {
      grpc::ChannelArguments args;
      args.SetInt("splitq.bench.channel", o_.channels + c);
      own.push_back(v1::Coordinator::NewStub(
          grpc::CreateCustomChannel(child_.address(), grpc::InsecureChannelCredentials(), args)));
    }
    Load load = Drive(
        o_.generator_threads, 1, o_.window, static_cast<uint64_t>(o_.connections), 0, 0,
        [&](uint64_t i, Done done) {
          const int m = static_cast<int>(i % static_cast<uint64_t>(o_.members));
          v1::HeartbeatRequest r;
          r.set_member_id(ids_[m].load());
          v1::Coordinator::Stub& stub = *own[i];
          Start<v1::HeartbeatRequest, v1::HeartbeatReply>(
              tokens_[m], std::move(r),
              [&stub](auto* c, auto* q, auto* p, auto cb) { stub.async()->Heartbeat(c, q, p, cb); },
              [done](const grpc::Status& s, const v1::HeartbeatReply&) { done(0, s); });
        });
    Rows({absl::StrCat("connections ", o_.connections, " open")}, load, cpu0);
    const double open_mb = child_.RssMb();
    own.clear();  // the channels go, and with them their connections
    // The coordinator trims freed memory at an expiry pass (every heartbeat period) at most
    // every 30 s (server/coordinator_service.cc): wait for both.
    const int wait_ms = o_.heartbeat_ms + 32000;
    std::this_thread::sleep_for(std::chrono::milliseconds(wait_ms));
    CoordinatorBenchRow r;
    r.phase = absl::StrCat("connections ", o_.connections, " closed");
    r.rss_mb = child_.RssMb();
    rows_.push_back(r);
    Progress(
        absl::StrFormat("connections: RSS %.0f MB before, %.0f MB with %d more open "
                        "(%.1f KB each), %.0f MB %d ms after they closed",
                        rss0, open_mb, o_.connections, (open_mb - rss0) * 1024 / o_.connections,
                        r.rss_mb, wait_ms));
  }

  void ExpirePhase() {
    // The last beat is now: death at the first expiry pass after the deadline (two periods),
    // at most a period later; forgetting at the first pass forget_after after that.
    const int wait_ms = 4 * o_.heartbeat_ms + 1000 * o_.forget_after_s + 1000;
    Progress(absl::StrCat("expire: everyone silent for ", wait_ms, " ms"));
    const double cpu0 = child_.CpuSeconds();
    const Clock::time_point t0 = Clock::now();
    std::this_thread::sleep_for(std::chrono::milliseconds(wait_ms));
    CoordinatorBenchRow r;
    r.phase = "expire (silent)";
    r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    r.server_cpu_us_per_call = (child_.CpuSeconds() - cpu0) * 1e6 / o_.members;
    r.rss_mb = child_.RssMb();
    const v1::StatusReply totals = Totals();
    r.live = totals.live_workers() + totals.live_clients();
    r.records = totals.records();
    r.calls = static_cast<uint64_t>(o_.members);
    rows_.push_back(r);
    Progress(
        absl::StrFormat("expire: %d live and %d records after it (0 expected), %.1f us CPU "
                        "per member, RSS %.0f MB",
                        r.live, r.records, r.server_cpu_us_per_call, r.rss_mb));
  }

  const CoordinatorBenchOptions o_;
  Child child_;
  std::vector<std::unique_ptr<v1::Coordinator::Stub>> stubs_;
  std::vector<std::string> names_, tokens_;
  std::unique_ptr<std::atomic<uint64_t>[]> ids_;
  std::mutex worker_of_mutex_;
  std::vector<std::string> worker_of_;
  std::atomic<uint64_t> cycle_{0};
  std::unique_ptr<std::atomic<bool>[]> busy_;  // churn pool members in a cycle now
  std::vector<CoordinatorBenchRow> rows_;
};

}  // namespace

absl::StatusOr<std::vector<CoordinatorBenchRow>> RunCoordinatorBench(
    const CoordinatorBenchOptions& options) {
  Bench bench(options);
  return bench.Run();
}

std::string FormatCoordinatorBench(const std::vector<CoordinatorBenchRow>& rows) {
  std::string out = absl::StrFormat("%-28s %9s %9s %8s %8s %8s %8s %9s %7s %7s %8s %6s\n", "phase",
                                    "calls", "calls/s", "p50 us", "p99 us", "p999 us", "max us",
                                    "cpu us/c", "RSS MB", "live", "records", "errors");
  for (const CoordinatorBenchRow& r : rows) {
    absl::StrAppendFormat(&out, "%-28s %9d %9.0f %8.0f %8.0f %8.0f %8.0f %9.1f %7.0f %7d %8d %6d\n",
                          r.phase, r.calls, r.calls_per_s(), r.p50_us, r.p99_us, r.p999_us,
                          r.max_us, r.server_cpu_us_per_call, r.rss_mb, r.live, r.records,
                          r.errors);
  }
  return out;
}

std::string CoordinatorBenchJson(const std::vector<CoordinatorBenchRow>& rows,
                                 const CoordinatorBenchOptions& o) {
  std::string out = absl::StrFormat(
      "{\"members\": %d, \"workers\": %d, \"seconds\": %d, \"rate\": %d, \"window\": %d, "
      "\"channels\": %d, \"heartbeat_ms\": %d, \"forget_after_s\": %d, \"churn_pool\": %d, "
      "\"cores\": %d, \"rows\": [",
      o.members, o.workers, o.seconds, o.rate, o.window, o.channels, o.heartbeat_ms,
      o.forget_after_s, o.churn_pool, static_cast<int>(std::thread::hardware_concurrency()));
  for (size_t i = 0; i < rows.size(); ++i) {
    const CoordinatorBenchRow& r = rows[i];
    absl::StrAppendFormat(&out,
                          "%s\n  {\"phase\": \"%s\", \"calls\": %d, \"errors\": %d, \"seconds\": "
                          "%.3f, \"calls_per_s\": %.1f, \"p50_us\": %.0f, \"p99_us\": %.0f, "
                          "\"p999_us\": %.0f, \"max_us\": %.0f, \"server_cpu_us_per_call\": "
                          "%.2f, \"rss_mb\": %.1f, \"live\": %d, \"records\": %d}",
                          i == 0 ? "" : ",", r.phase, r.calls, r.errors, r.seconds, r.calls_per_s(),
                          r.p50_us, r.p99_us, r.p999_us, r.max_us, r.server_cpu_us_per_call,
                          r.rss_mb, r.live, r.records);
  }
  out += "\n]}\n";
  return out;
}

}  // namespace splitq::tools
