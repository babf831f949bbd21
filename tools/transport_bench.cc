#include "tools/transport_bench.h"

#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "proto/chunk_codec.h"
#include "splitq/v1/worker.grpc.pb.h"

namespace splitq::tools {

// The worker protocol's chunk codec and frame assembler, as a session uses them.
using namespace ::splitq::rpc;  // NOLINT(build/namespaces)

namespace {

using Clock = std::chrono::steady_clock;
using splitq::v1::TrainReply;
using splitq::v1::TrainRequest;
constexpr int64_t kMaxChunkBytes = 4 << 20;
constexpr int64_t kMaxFrameBytes = 64 << 20;

// Reads every chunk of every frame; answers each frame's last chunk with a StepResult.
class SinkWorker final : public splitq::v1::Worker::Service {
 public:
  grpc::Status Train(
      grpc::ServerContext*,
      grpc::ServerReaderWriter<splitq::v1::TrainReply, splitq::v1::TrainRequest>* stream) override {
    splitq::v1::TrainRequest request;
    while (stream->Read(&request)) {
      if (!request.has_activation()) continue;
      const splitq::v1::FrameChunk& chunk = request.activation();
      if (chunk.index() + 1 == chunk.count()) {
        splitq::v1::TrainReply reply;
        reply.mutable_result()->set_step(chunk.step());
        if (!stream->Write(reply)) break;
      }
    }
    return grpc::Status::OK;
  }
};

// The same on the callback API, as WorkerService reads: one read outstanding at a time. The
// client may see an answer (and send the next frame) before OnWriteDone, so a second answer
// waits for the first write to complete. Message = TrainRequest: through the generated classes,
// the last chunk of a frame answered; Message = ByteBuffer: as WorkerService reads, chunks
// decoded without copies (chunk_codec.h) and reassembled into the frame.
template <typename Message, typename Reply>
class SinkReactor final : public grpc::ServerBidiReactor<Message, Reply> {
 public:
  SinkReactor() { this->StartRead(&request_); }
  void OnReadDone(bool ok) override {
    if (!ok) {
      std::lock_guard<std::mutex> lock(mutex_);
      read_closed_ = true;
      if (!writing_) this->Finish(grpc::Status::OK);
      return;
    }
    absl::StatusOr<std::optional<uint64_t>> done = FrameDone();
    if (!done.ok()) {
      this->Finish(
          grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, std::string(done.status().message())));
      return;
    }
    if (*done) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (writing_) {
        pending_step_ = static_cast<int64_t>(**done);
      } else {
        WriteLocked(**done);
      }
    }
    this->StartRead(&request_);
  }
  void OnWriteDone(bool) override {
    std::lock_guard<std::mutex> lock(mutex_);
    writing_ = false;
    if (pending_step_ >= 0) {
      WriteLocked(static_cast<uint64_t>(pending_step_));
      pending_step_ = -1;
    } else if (read_closed_) {
      this->Finish(grpc::Status::OK);
    }
  }
  void OnDone() override { delete this; }

 private:
  // The step of the frame request_ completed, if it did.
  absl::StatusOr<std::optional<uint64_t>> FrameDone() {
    if constexpr (std::is_same_v<Message, TrainRequest>) {
      const splitq::v1::FrameChunk& c = request_.activation();
      if (request_.has_activation() && c.index() + 1 == c.count()) return c.step();
      return std::nullopt;
    } else {
      std::optional<rpc::ChunkMessage> m = rpc::DecodeChunk(request_);
      if (!m) return absl::InvalidArgumentError("not a chunk");
      auto frame = assembler_.Add(m->chunk, m->chunk.index == 0 ? m->chunk.step : step_);
      if (!frame.ok()) return frame.status();
      step_ = m->chunk.step;
      if (*frame) return step_;
      return std::nullopt;
    }
  }

  void WriteLocked(uint64_t step) {
    writing_ = true;
    TrainReply reply;
    reply.mutable_result()->set_step(step);
    if constexpr (std::is_same_v<Reply, grpc::ByteBuffer>) {
      reply_ = rpc::ToByteBuffer(reply);
    } else {
      reply_ = reply;
    }
    this->StartWrite(&reply_);
  }

  Message request_;
  rpc::FrameAssembler assembler_;  // ByteBuffer only
  uint64_t step_ = 0;
  std::mutex mutex_;
  Reply reply_;  // being written while writing_
  bool writing_ = false;
  bool read_closed_ = false;
  int64_t pending_step_ = -1;
};

class CallbackSinkWorker final : public splitq::v1::Worker::CallbackService {
 public:
  grpc::ServerBidiReactor<TrainRequest, TrainReply>* Train(grpc::CallbackServerContext*) override {
    return new SinkReactor<TrainRequest, TrainReply>();
  }
};

class RawSinkWorker final
    : public splitq::v1::Worker::WithRawCallbackMethod_Train<
          splitq::v1::Worker::WithCallbackMethod_Evaluate<splitq::v1::Worker::Service>> {
 public:
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* Train(
      grpc::CallbackServerContext*) override {
    return new SinkReactor<grpc::ByteBuffer, grpc::ByteBuffer>();
  }
};

// All `n` threads leave Wait() together (a reusable barrier).
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void Wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const int64_t generation = generation_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++generation_;
      all_.notify_all();
    } else {
      all_.wait(lock, [&] { return generation_ != generation; });
    }
  }

 private:
  const int n_;
  std::mutex mutex_;
  std::condition_variable all_;
  int arrived_ = 0;
  int64_t generation_ = 0;
};

bool SendAll(int fd, const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL);
    if (k <= 0) return false;
    p += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

bool RecvAll(int fd, void* data, size_t n) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    const ssize_t k = ::recv(fd, p, n, 0);
    if (k <= 0) return false;
    p += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

// Stream `lane` of `lanes` carries chunks lane, lane + lanes, ... of each frame (numbered
// 0..k-1 within the stream, with the stream's own byte count, so its server answers after its
// own last one). Raw: chunks as WorkerClient sends them (chunk_codec.h, no copies); otherwise
// through the generated classes. Seconds from the first barrier to the last frame's answer;
// -1 if the stream broke.
double LaneSeconds(const std::shared_ptr<grpc::Channel>& channel,
                   const std::shared_ptr<const std::string>& payload, int frames,
                   int64_t chunk_bytes, bool raw, int lane, int lanes, Barrier& barrier) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(5));
  std::unique_ptr<rpc::RawStream> raw_stream;
  std::unique_ptr<grpc::ClientReaderWriter<TrainRequest, TrainReply>> stream;
  splitq::v1::Worker::Stub stub(channel);
  if (raw) {
    raw_stream = rpc::OpenRawStream(channel.get(), rpc::kWorkerTrainMethod, &context);
  } else {
    stream = stub.Train(&context);
  }
  const int64_t bytes = static_cast<int64_t>(payload->size());
  const int count = static_cast<int>((bytes + chunk_bytes - 1) / chunk_bytes);
  std::vector<int> mine;
  int64_t my_bytes = 0;
  for (int i = lane; i < count; i += lanes) {
    mine.push_back(i);
    my_bytes += std::min(chunk_bytes, bytes - i * chunk_bytes);
  }
  const auto n = static_cast<uint32_t>(mine.size());
  TrainRequest request;
  TrainReply reply;
  grpc::ByteBuffer raw_reply;
  bool ok = true;
  barrier.Wait();
  const auto start = Clock::now();
  for (int f = 0; f < frames; ++f) {
    for (uint32_t k = 0; k < n && ok; ++k) {
      const int64_t begin = mine[k] * chunk_bytes;
      const auto length = static_cast<size_t>(std::min(chunk_bytes, bytes - begin));
      if (raw) {
        ok = raw_stream->Write(rpc::EncodeChunk(static_cast<uint64_t>(f), k, n,
                                                static_cast<uint64_t>(my_bytes), payload,
                                                static_cast<size_t>(begin), length));
      } else {
        splitq::v1::FrameChunk* chunk = request.mutable_activation();
        chunk->set_step(static_cast<uint64_t>(f));
        chunk->set_index(k);
        chunk->set_count(n);
        chunk->set_frame_bytes(static_cast<uint64_t>(my_bytes));
        chunk->set_data(payload->data() + begin, length);
        ok = stream->Write(request);
      }
    }
    if (ok && n > 0) ok = raw ? raw_stream->Read(&raw_reply) : stream->Read(&reply);
    if (lanes > 1) barrier.Wait();  // keeps going after a failure, so no lane waits forever
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (raw) {
    raw_stream->WritesDone();
    raw_stream->Finish();
  } else {
    stream->WritesDone();
    stream->Finish();
  }
  return ok ? seconds : -1;
}

// Seconds to move `frames` frames of `payload` over one stream per channel.
double GrpcSeconds(const std::vector<std::shared_ptr<grpc::Channel>>& channels,
                   const std::shared_ptr<const std::string>& payload, int frames,
                   int64_t chunk_bytes, bool raw) {
  const int lanes = static_cast<int>(channels.size());
  Barrier barrier(lanes);
  if (lanes == 1) {
    return LaneSeconds(channels[0], payload, frames, chunk_bytes, raw, 0, 1, barrier);
  }
  std::vector<double> seconds(static_cast<size_t>(lanes));
  std::vector<std::thread> threads;
  for (int lane = 0; lane < lanes; ++lane) {
    threads.emplace_back([&, lane] {
      seconds[static_cast<size_t>(lane)] =
          LaneSeconds(channels[static_cast<size_t>(lane)], payload, frames, chunk_bytes, raw, lane,
                      lanes, barrier);
    });
  }
  for (std::thread& t : threads) t.join();
  if (*std::min_element(seconds.begin(), seconds.end()) < 0) return -1;
  return *std::max_element(seconds.begin(), seconds.end());
}

// Seconds to move the same frames over `connections` TCP connections on loopback, each its own
// `frames` frames with one in flight, all started together: the slowest connection's time.
double TcpSeconds(const std::string& payload, int frames, int connections = 1) {
  const int listener = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;  // the OS picks
  socklen_t len = sizeof(addr);
  if (::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::listen(listener, connections) != 0 ||
      ::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    ::close(listener);
    return -1;
  }
  // One server thread per connection, as the accepts come.
  std::vector<std::thread> servers;
  std::thread acceptor([&, listener, frames] {
    for (int c = 0; c < connections; ++c) {
      const int fd = ::accept(listener, nullptr, nullptr);
      if (fd < 0) return;
      servers.emplace_back([fd, frames] {
        std::vector<char> buffer;
        for (int f = 0; f < frames; ++f) {
          uint64_t n = 0;
          if (!RecvAll(fd, &n, sizeof(n))) break;
          buffer.resize(n);
          if (!RecvAll(fd, buffer.data(), n)) break;
          const char ack = 1;
          if (!SendAll(fd, &ack, 1)) break;
        }
        ::close(fd);
      });
    }
  });
  Barrier barrier(connections);
  std::vector<double> seconds(static_cast<size_t>(connections), -1);
  std::vector<std::thread> clients;
  for (int c = 0; c < connections; ++c) {
    clients.emplace_back([&, c] {
      const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
      const int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      const bool connected = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
      barrier.Wait();
      if (connected) {
        const auto start = Clock::now();
        bool ok = true;
        for (int f = 0; f < frames && ok; ++f) {
          const uint64_t n = payload.size();
          char ack = 0;
          ok = SendAll(fd, &n, sizeof(n)) && SendAll(fd, payload.data(), n) && RecvAll(fd, &ack, 1);
        }
        if (ok) {
          seconds[static_cast<size_t>(c)] =
              std::chrono::duration<double>(Clock::now() - start).count();
        }
      }
      ::close(fd);
    });
  }
  for (std::thread& t : clients) t.join();
  acceptor.join();
  for (std::thread& t : servers) t.join();
  ::close(listener);
  if (*std::min_element(seconds.begin(), seconds.end()) < 0) return -1;
  return *std::max_element(seconds.begin(), seconds.end());
}

// Seconds for `sessions` independent sessions (one stream on its own channel each, whole
// frames, one in flight), started together: the slowest session's time.
double SessionsSeconds(const std::vector<std::shared_ptr<grpc::Channel>>& channels,
                       const std::shared_ptr<const std::string>& payload, int frames,
                       int64_t chunk_bytes, bool raw) {
  const int sessions = static_cast<int>(channels.size());
  Barrier barrier(sessions);
  std::vector<double> seconds(static_cast<size_t>(sessions));
  std::vector<std::thread> threads;
  for (int i = 0; i < sessions; ++i) {
    threads.emplace_back([&, i] {
      seconds[static_cast<size_t>(i)] = LaneSeconds(channels[static_cast<size_t>(i)], payload,
                                                    frames, chunk_bytes, raw, 0, 1, barrier);
    });
  }
  for (std::thread& t : threads) t.join();
  if (*std::min_element(seconds.begin(), seconds.end()) < 0) return -1;
  return *std::max_element(seconds.begin(), seconds.end());
}

}  // namespace

absl::StatusOr<std::vector<TransportResult>> RunTransportBench(const TransportOptions& options) {
  if (options.mib_per_size < 1) return absl::InvalidArgumentError("mib_per_size must be >= 1");
  if (options.chunk_bytes < 1024 || options.chunk_bytes > kMaxChunkBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk size ", options.chunk_bytes, " bytes is outside 1 KiB .. 4 MiB"));
  }
  if (options.streams < 1 || options.streams > 16) {
    return absl::InvalidArgumentError(
        absl::StrCat("streams ", options.streams, " is outside 1 .. 16"));
  }
  if (options.sessions < 1 || options.sessions > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("sessions ", options.sessions, " is outside 1 .. 64"));
  }
  if (options.sessions > 1 && options.streams > 1) {
    return absl::InvalidArgumentError("sessions and striped streams do not combine");
  }
  std::vector<int64_t> sizes = options.frame_sizes;
  if (sizes.empty()) sizes = {int64_t{64} << 10, int64_t{256} << 10, 1 << 20, 4 << 20, 16 << 20};
  for (const int64_t size : sizes) {
    if (size < 1024 || size > kMaxFrameBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("frame size ", size, " bytes is outside 1 KiB .. 64 MiB"));
    }
  }
  if (!options.protobuf_messages && !options.callback_server) {
    return absl::InvalidArgumentError("the sync server reads protobuf messages only");
  }
  SinkWorker sync_service;
  CallbackSinkWorker callback_service;
  RawSinkWorker raw_service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(kMaxChunkBytes + (64 << 10));
  for (const auto& [name, value] : options.grpc_args) builder.AddChannelArgument(name, value);
  if (!options.callback_server) {
    builder.RegisterService(&sync_service);
  } else if (options.protobuf_messages) {
    builder.RegisterService(&callback_service);
  } else {
    builder.RegisterService(&raw_service);
  }
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return absl::UnavailableError("cannot start a gRPC server on loopback");
  }
  // One channel per stream; distinct arguments and local subchannel pools keep their HTTP/2
  // connections apart.
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  for (int lane = 0; lane < std::max(options.streams, options.sessions); ++lane) {
    grpc::ChannelArguments args;
    args.SetMaxSendMessageSize(kMaxChunkBytes + (64 << 10));
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    args.SetInt("splitq.bench_lane", lane);
    for (const auto& [name, value] : options.grpc_args) args.SetInt(name, value);
    channels.push_back(grpc::CreateCustomChannel("127.0.0.1:" + std::to_string(port),
                                                 grpc::InsecureChannelCredentials(), args));
  }
  const bool raw = !options.protobuf_messages;
  const auto grpc_seconds = [&](const std::shared_ptr<const std::string>& payload, int frames) {
    if (options.sessions > 1) {
      return SessionsSeconds(channels, payload, frames, options.chunk_bytes, raw);
    }
    return GrpcSeconds(channels, payload, frames, options.chunk_bytes, raw);
  };
  std::vector<TransportResult> results;
  for (const int64_t size : sizes) {
    const auto shared = std::make_shared<const std::string>(static_cast<size_t>(size), '\x5a');
    const std::string& payload = *shared;
    const int frames =
        static_cast<int>(std::max<int64_t>(4, (int64_t{options.mib_per_size} << 20) / size));
    grpc_seconds(shared, std::max(1, frames / 8));  // warm-up
    // Alternate, three rounds each, and keep each side's best (least disturbed) round.
    double grpc_best = 1e30, tcp_best = 1e30;
    for (int round = 0; round < 3; ++round) {
      const double g = grpc_seconds(shared, frames);
      const double t = TcpSeconds(payload, frames, options.sessions);
      if (g < 0 || t < 0) return absl::InternalError("a transfer failed");
      grpc_best = std::min(grpc_best, g);
      tcp_best = std::min(tcp_best, t);
    }
    const double total = static_cast<double>(size) * frames * options.sessions / 1e6;
    results.push_back(TransportResult{size, frames, total / grpc_best, total / tcp_best});
  }
  server->Shutdown();
  return results;
}

}  // namespace splitq::tools
