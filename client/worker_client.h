// splitq server: the client side of the Worker service, as a trainer::ServerLink (sync gRPC
// API: a client has one step in flight and nothing else to do meanwhile).
//
// Train keeps one Train stream open across steps: the first call opens it with a hello
// (resume_step = that step), each call then writes the step's labels and its frame in chunks
// and reads the gradient's chunks and the result. Evaluate does the same on an Evaluate
// stream. Any failure closes the stream and returns the status (the next call opens a new
// stream, that is a new session; see ClientPart::NewSession). A worker that is full at the
// Train hello (RESOURCE_EXHAUSTED) comes back as UNAVAILABLE: a passing state, to be retried.
//
// Messages go as raw ByteBuffers in protobuf's wire format: frame chunks without copies
// (chunk_codec.h: the activation frame is sent from the UpFrame's own bytes, a gradient is
// reassembled straight from the received slices), the rest through the generated classes.
//
// Deadlines: each stream has a deadline (`stream_deadline`, default 24 h: a run longer than that
// reconnects once a day) and keepalive pings detect a dead worker or network within
// ~2 x keepalive_ms.
#pragma once

#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>
#include <grpcpp/support/channel_arguments.h>

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "proto/chunk_codec.h"  // RawStream
#include "proto/frame_assembler.h"
#include "proto/rpc_channel.h"
#include "splitq/v1/worker.grpc.pb.h"
#include "trainer/split_link.h"

namespace splitq::client {

struct WorkerLinkOptions {
  std::string client_id;          // as registered with the coordinator
  std::string token;              // bearer token ("" to send none)
  std::string config_digest;      // hex SHA-256 of the run config ("" to skip the check)
  std::string run_id;             // the client's run (TrainHello.run_id; "" for none)
  int64_t chunk_bytes = 1 << 20;  // frames go up in chunks of this size
  rpc::AssemblerLimits limits;    // for the gradient frames coming down
  std::chrono::seconds stream_deadline{24 * 3600};
  // Called when a worker's welcome says that steps first..last of this client were lost with
  // its state (TrainWelcome.next_applied below the step sent). May be empty.
  std::function<void(int64_t first, int64_t last)> lost;
  // A step's answer (a gradient, a U-shaped output, a validation result) that has not come this
  // long after the step was sent ends the stream with DEADLINE_EXCEEDED, which the client treats
  // as a broken link (it reconnects, perhaps to another worker, and resends the step). Before,
  // a worker that took a step and never answered held the client for good (the sixth outside
  // probe: 624 s, no log line). 0: no limit. `splitq client --reply-timeout-s`.
  std::chrono::milliseconds reply_timeout{300000};
};

// Channel arguments every splitq client uses: keepalive pings every `keepalive_ms` (dead after
// another keepalive_ms without an answer), reconnect backoff at most 5 s, and message sizes
// for 4 MiB chunks.
grpc::ChannelArguments ClientChannelArguments(int keepalive_ms = 10000);

// A channel to `target` (HOST:PORT) with those arguments and the credentials `security` asks
// for (INVALID_ARGUMENT for contradictory flags, NOT_FOUND for missing certificate files).
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const std::string& target,
                                                           const rpc::TransportSecurity& security);

class WorkerClient : public trainer::ServerLink {
 public:
  WorkerClient(std::shared_ptr<grpc::Channel> channel, WorkerLinkOptions options);
  ~WorkerClient() override;

  absl::StatusOr<trainer::DownFrame> Train(const trainer::UpFrame& up) override;
  // U-shaped: the head loss and gradient of the step Train opened, on the same stream.
  absl::StatusOr<trainer::DownFrame> TrainHead(const trainer::HeadGradient& head) override;
  absl::StatusOr<trainer::EvalPiece> Evaluate(const trainer::UpFrame& up) override;
  // Ends the Evaluate stream cleanly (WritesDone, Finish), if one is open.
  void EndEvaluation() override;
  // Ends both streams cleanly (WritesDone, Finish).
  void Close();

  uint64_t session_id() const { return session_id_; }
  // The last Train hello was refused because the worker was full.
  bool refused_full() const { return refused_full_; }

 private:
  template <typename Stream>
  struct Open {
    std::unique_ptr<grpc::ClientContext> context;
    std::unique_ptr<Stream> stream;
    int64_t step = -1;  // Evaluate: the training step in its hello
  };

  // Cancels the call of an armed context at its deadline (a thread, started on first use).
  class ReplyWatch {
   public:
    ~ReplyWatch();
    void Arm(grpc::ClientContext* context, std::chrono::milliseconds timeout);
    // Disarms (before the armed context may go: Fail calls it first); true if it cancelled
    // the call since the last Arm (so does every later call, until the next Arm).
    bool Disarm();

   private:
    void Run();
    std::mutex mutex_;
    std::condition_variable wake_;
    std::thread thread_;
    grpc::ClientContext* context_ = nullptr;  // armed (under mutex_)
    std::chrono::steady_clock::time_point deadline_;
    bool fired_ = false, stop_ = false;
  };

  std::unique_ptr<grpc::ClientContext> NewContext() const;
  absl::Status OpenTrain(int64_t step);
  template <typename Stream>
  absl::Status Fail(Open<Stream>& open, const char* what, bool cancel = false);
  // Reads one frame of `step` (gradient, or U-shaped output) and its StepResult, within
  // options_.reply_timeout (ReadAnswerFrames does the reading).
  absl::StatusOr<trainer::DownFrame> ReadAnswer(int64_t step);
  absl::StatusOr<trainer::DownFrame> ReadAnswerFrames(int64_t step);

  std::shared_ptr<grpc::Channel> channel_;
  WorkerLinkOptions options_;
  Open<rpc::RawStream> train_;
  Open<rpc::RawStream> eval_;
  uint64_t session_id_ = 0;
  bool refused_full_ = false;
  ReplyWatch watch_;
};

}  // namespace splitq::client
