#include "server/transport_bench.h"

#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "splitq/v1/worker.grpc.pb.h"

namespace splitq::server {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int64_t kChunkBytes = 4 << 20;

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

// Seconds to move `frames` frames of `bytes` over gRPC.
double GrpcSeconds(splitq::v1::Worker::Stub& stub, const std::string& payload, int frames) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(5));
  auto stream = stub.Train(&context);
  const int64_t bytes = static_cast<int64_t>(payload.size());
  const int count = static_cast<int>((bytes + kChunkBytes - 1) / kChunkBytes);
  splitq::v1::TrainRequest request;
  splitq::v1::TrainReply reply;
  const auto start = Clock::now();
  for (int f = 0; f < frames; ++f) {
    for (int i = 0; i < count; ++i) {
      splitq::v1::FrameChunk* chunk = request.mutable_activation();
      chunk->set_step(static_cast<uint64_t>(f));
      chunk->set_index(static_cast<uint32_t>(i));
      chunk->set_count(static_cast<uint32_t>(count));
      chunk->set_frame_bytes(static_cast<uint64_t>(bytes));
      const int64_t begin = i * kChunkBytes;
      chunk->set_data(payload.data() + begin, std::min(kChunkBytes, bytes - begin));
      if (!stream->Write(request)) return -1;
    }
    if (!stream->Read(&reply)) return -1;
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  stream->WritesDone();
  stream->Finish();
  return seconds;
}

// Seconds to move the same frames over one TCP connection on loopback.
double TcpSeconds(const std::string& payload, int frames) {
  const int listener = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;  // the OS picks
  socklen_t len = sizeof(addr);
  if (::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::listen(listener, 1) != 0 ||
      ::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    ::close(listener);
    return -1;
  }
  std::thread server([listener, frames] {
    const int fd = ::accept(listener, nullptr, nullptr);
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
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  double seconds = -1;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    const auto start = Clock::now();
    bool ok = true;
    for (int f = 0; f < frames && ok; ++f) {
      const uint64_t n = payload.size();
      char ack = 0;
      ok = SendAll(fd, &n, sizeof(n)) && SendAll(fd, payload.data(), n) && RecvAll(fd, &ack, 1);
    }
    if (ok) seconds = std::chrono::duration<double>(Clock::now() - start).count();
  }
  ::close(fd);
  server.join();
  ::close(listener);
  return seconds;
}

}  // namespace

absl::StatusOr<std::vector<TransportResult>> RunTransportBench(int mib_per_size) {
  SinkWorker service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(kChunkBytes + (64 << 10));
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return absl::UnavailableError("cannot start a gRPC server on loopback");
  }
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(kChunkBytes + (64 << 10));
  auto stub = splitq::v1::Worker::NewStub(grpc::CreateCustomChannel(
      "127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials(), args));
  std::vector<TransportResult> results;
  for (const int64_t size : {int64_t{64} << 10, int64_t{256} << 10, int64_t{1} << 20,
                             int64_t{4} << 20, int64_t{16} << 20}) {
    const std::string payload(static_cast<size_t>(size), '\x5a');
    const int frames = static_cast<int>(std::max<int64_t>(4, (int64_t{mib_per_size} << 20) / size));
    GrpcSeconds(*stub, payload, std::max(1, frames / 8));  // warm-up
    // Alternate, three rounds each, and keep each side's best (least disturbed) round.
    double grpc_best = 1e30, tcp_best = 1e30;
    for (int round = 0; round < 3; ++round) {
      const double g = GrpcSeconds(*stub, payload, frames);
      const double t = TcpSeconds(payload, frames);
      if (g < 0 || t < 0) return absl::InternalError("a transfer failed");
      grpc_best = std::min(grpc_best, g);
      tcp_best = std::min(tcp_best, t);
    }
    const double total = static_cast<double>(size) * frames / 1e6;
    results.push_back(TransportResult{size, frames, total / grpc_best, total / tcp_best});
  }
  server->Shutdown();
  return results;
}

}  // namespace splitq::server
