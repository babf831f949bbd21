#include "client/worker_client.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/support/channel_arguments.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "proto/chunk_codec.h"
#include "proto/protocol.h"
#include "proto/rpc_channel.h"

namespace splitq::client {
namespace {

template <typename Request>
void FillHello(Request* request, const WorkerLinkOptions& o, int64_t step) {
  auto* hello = request->mutable_hello();
  hello->set_protocol_version(splitq::v1::PROTOCOL_VERSION_CURRENT);
  hello->set_client_id(o.client_id);
  hello->set_resume_step(static_cast<uint64_t>(step));
  hello->set_config_digest(o.config_digest);
  hello->set_run_id(o.run_id);
}

template <typename Message, typename Stream>
bool Write(Stream& stream, const Message& message) {
  return stream.Write(rpc::ToByteBuffer(message));
}

// Writes `frame` as chunks of field `field` (the bytes are not copied). False when the stream
// broke.
template <typename Stream>
bool WriteChunks(Stream& stream, int64_t step, const std::shared_ptr<const std::string>& frame,
                 int64_t chunk_bytes, int field) {
  const int64_t size = static_cast<int64_t>(frame->size());
  const uint32_t count =
      static_cast<uint32_t>(std::max<int64_t>(1, (size + chunk_bytes - 1) / chunk_bytes));
  for (uint32_t i = 0; i < count; ++i) {
    const int64_t begin = i * chunk_bytes;
    const grpc::ByteBuffer chunk =
        rpc::EncodeChunk(static_cast<uint64_t>(step), i, count, static_cast<uint64_t>(size), frame,
                         static_cast<size_t>(begin),
                         static_cast<size_t>(std::min(chunk_bytes, size - begin)), field);
    if (!stream.Write(chunk)) return false;
  }
  return true;
}

// Writes a step's labels, then its frame in chunks (the frame's bytes are not copied). False
// when the stream broke.
template <typename Request, typename Stream>
bool WriteStep(Stream& stream, const trainer::UpFrame& up, int64_t chunk_bytes) {
  Request labels;
  auto* l = labels.mutable_labels();
  l->set_step(static_cast<uint64_t>(up.step));
  l->mutable_values()->Add(up.labels.begin(), up.labels.end());
  l->mutable_sample_ids()->Add(up.sample_ids.begin(), up.sample_ids.end());
  if (!Write(stream, labels)) return false;
  return WriteChunks(stream, up.step, up.frame, chunk_bytes, rpc::kChunkField);
}

}  // namespace

grpc::ChannelArguments ClientChannelArguments(int keepalive_ms) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, keepalive_ms);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, keepalive_ms);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  // gRPC's own reconnect backoff grows to 120 s by default; a restarted coordinator or worker
  // is found again within 5 s (our retries above it back off to 5 s as well).
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 5000);
  args.SetMaxReceiveMessageSize(rpc::MaxMessageBytes(rpc::AssemblerLimits{}));
  args.SetMaxSendMessageSize(rpc::MaxMessageBytes(rpc::AssemblerLimits{}));
  return args;
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const std::string& target,
                                                           const rpc::TransportSecurity& security) {
  SPLITQ_RETURN_IF_ERROR(rpc::ValidateSecurity(security));
  SPLITQ_ASSIGN_OR_RETURN(auto credentials, rpc::MakeChannelCredentials(security));
  return grpc::CreateCustomChannel(target, credentials, ClientChannelArguments());
}

WorkerClient::WorkerClient(std::shared_ptr<grpc::Channel> channel, WorkerLinkOptions options)
    : channel_(std::move(channel)), options_(std::move(options)) {
  options_.chunk_bytes =
      std::clamp<int64_t>(options_.chunk_bytes, 1, options_.limits.max_chunk_bytes);
}

WorkerClient::~WorkerClient() { Close(); }

WorkerClient::ReplyWatch::~ReplyWatch() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void WorkerClient::ReplyWatch::Arm(grpc::ClientContext* context,
                                   std::chrono::milliseconds timeout) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    context_ = context;
    deadline_ = std::chrono::steady_clock::now() + timeout;
    fired_ = false;
    if (!thread_.joinable()) thread_ = std::thread([this] { Run(); });
  }
  wake_.notify_all();
}

bool WorkerClient::ReplyWatch::Disarm() {
  std::lock_guard<std::mutex> lock(mutex_);
  context_ = nullptr;
  return fired_;
}

void WorkerClient::ReplyWatch::Run() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stop_) {
    if (context_ == nullptr) {
      wake_.wait(lock);
    } else if (wake_.wait_until(lock, deadline_) == std::cv_status::timeout &&
               context_ != nullptr && std::chrono::steady_clock::now() >= deadline_) {
      context_->TryCancel();  // the reader's Read returns false; Disarm tells it why
      context_ = nullptr;
      fired_ = true;
    }
  }
}

namespace {
// A reply's numbers are the worker's word: a non-finite loss would make the client's
// metrics.jsonl invalid JSON (and a worker never sends one: it refuses such a step itself).
absl::Status CheckResult(double loss, double grad_bits, double act_bits) {
  if (!std::isfinite(loss)) {
    return absl::InternalError(absl::StrCat("the worker's loss is not finite (", loss, ")"));
  }
  for (const double bits : {grad_bits, act_bits}) {
    if (!std::isfinite(bits) || bits < 0 || bits > 64) {
      return absl::InternalError(absl::StrCat("the worker's bit count ", bits, " is not in 0..64"));
    }
  }
  return absl::OkStatus();
}
}  // namespace

std::unique_ptr<grpc::ClientContext> WorkerClient::NewContext() const {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() + options_.stream_deadline);
  if (!options_.token.empty()) rpc::AddBearer(*context, options_.token);
  return context;
}

template <typename Stream>
absl::Status WorkerClient::Fail(Open<Stream>& open, const char* what, bool cancel) {
  absl::Status status;
  (void)watch_.Disarm();  // it must not cancel a context that is about to go
  if (open.stream) {
    // After a failed Read or Write the worker has ended the stream, and Finish returns its
    // status; a stream we abandon (a bad reply) is cancelled first, or Finish would wait.
    if (cancel) open.context->TryCancel();
    status = rpc::FromGrpcStatus(open.stream->Finish());
  }
  open.stream.reset();
  open.context.reset();
  if (status.ok() || status.code() == absl::StatusCode::kCancelled) {
    status = absl::UnavailableError(absl::StrCat("the worker stream broke (", what, ")"));
  }
  return status;
}

namespace {
// A worker that is full at the hello is a passing state (a session may end, or the coordinator
// may move this client): UNAVAILABLE, which the caller retries.
absl::Status FullIsTransient(absl::Status status) {
  if (status.code() != absl::StatusCode::kResourceExhausted) return status;
  return absl::UnavailableError(absl::StrCat("the worker is full: ", status.message()));
}
}  // namespace

absl::Status WorkerClient::OpenTrain(int64_t step) {
  train_.context = NewContext();
  train_.stream = rpc::OpenRawStream(channel_.get(), rpc::kWorkerTrainMethod, train_.context.get());
  splitq::v1::TrainRequest hello;
  FillHello(&hello, options_, step);
  grpc::ByteBuffer raw;
  if (!Write(*train_.stream, hello) || !train_.stream->Read(&raw)) {
    const absl::Status status = Fail(train_, "hello");
    refused_full_ = status.code() == absl::StatusCode::kResourceExhausted;
    return FullIsTransient(status);
  }
  refused_full_ = false;
  splitq::v1::TrainReply reply;
  if (!rpc::FromByteBuffer(&raw, &reply)) {
    (void)Fail(train_, "welcome", true);
    return absl::InternalError("the worker's welcome does not parse");
  }
  if (!reply.has_welcome()) {
    (void)Fail(train_, "welcome", true);
    return absl::InternalError("the worker answered the hello without a welcome");
  }
  if (reply.welcome().expected_step() != static_cast<uint64_t>(step)) {
    (void)Fail(train_, "welcome", true);
    return absl::InternalError(
        absl::StrCat("the worker expects step ", reply.welcome().expected_step(), ", not ", step));
  }
  session_id_ = reply.welcome().session_id();
  if (reply.welcome().has_next_applied() && options_.lost &&
      reply.welcome().next_applied() < static_cast<uint64_t>(step)) {
    options_.lost(static_cast<int64_t>(reply.welcome().next_applied()), step - 1);
  }
  return absl::OkStatus();
}

absl::StatusOr<trainer::DownFrame> WorkerClient::Train(const trainer::UpFrame& up) {
  if (!train_.stream) SPLITQ_RETURN_IF_ERROR(OpenTrain(up.step));
  if (!WriteStep<splitq::v1::TrainRequest>(*train_.stream, up, options_.chunk_bytes)) {
    return Fail(train_, "sending a frame");
  }
  return ReadAnswer(up.step);
}

absl::StatusOr<trainer::DownFrame> WorkerClient::TrainHead(const trainer::HeadGradient& head) {
  if (!train_.stream) return absl::UnavailableError("the worker stream broke before the head");
  splitq::v1::TrainRequest loss;
  loss.mutable_head_loss()->set_step(static_cast<uint64_t>(head.step));
  loss.mutable_head_loss()->set_loss(head.loss);
  if (!Write(*train_.stream, loss)) return Fail(train_, "sending a head loss");
  const auto frame = std::make_shared<const std::string>(head.frame);
  if (!WriteChunks(*train_.stream, head.step, frame, options_.chunk_bytes,
                   rpc::kSecondChunkField)) {
    return Fail(train_, "sending a head gradient");
  }
  return ReadAnswer(head.step);
}

absl::StatusOr<trainer::DownFrame> WorkerClient::ReadAnswer(int64_t step) {
  if (options_.reply_timeout.count() > 0) watch_.Arm(train_.context.get(), options_.reply_timeout);
  absl::StatusOr<trainer::DownFrame> answer = ReadAnswerFrames(step);
  if (watch_.Disarm() && !answer.ok()) {
    return absl::DeadlineExceededError(
        absl::StrCat("the worker did not answer step ", step, " within ",
                     absl::SixDigits(options_.reply_timeout.count() / 1000.0),
                     " s (splitq client --reply-timeout-s): giving up on this stream"));
  }
  return answer;
}

absl::StatusOr<trainer::DownFrame> WorkerClient::ReadAnswerFrames(int64_t step) {
  rpc::FrameAssembler assembler(options_.limits);
  trainer::DownFrame down;
  down.step = step;
  bool have_frame = false;
  grpc::ByteBuffer raw;
  splitq::v1::TrainReply reply;
  while (train_.stream->Read(&raw)) {
    std::optional<rpc::ChunkMessage> fast =
        rpc::DecodeChunk(raw);  // a frame chunk, as we send them
    if (!fast && !rpc::FromByteBuffer(&raw, &reply)) {
      (void)Fail(train_, "reply", true);
      return absl::InternalError("a reply from the worker does not parse");
    }
    if (fast || reply.has_gradient() || reply.has_output()) {
      rpc::Chunk chunk;
      if (fast) {
        chunk = fast->chunk;
      } else {
        const auto& g = reply.has_gradient() ? reply.gradient() : reply.output();
        chunk = rpc::Chunk{g.step(), g.index(), g.count(), g.frame_bytes(), g.data(), {}};
      }
      auto frame = assembler.Add(chunk, static_cast<uint64_t>(step));
      if (!frame.ok()) {
        (void)Fail(train_, "gradient", true);
        return absl::InternalError(absl::StrCat("the worker's frame: ", frame.status().message()));
      }
      if (*frame) {
        down.frame = std::move(**frame);
        have_frame = true;
      }
    } else if (reply.has_result()) {
      if (!have_frame || reply.result().step() != static_cast<uint64_t>(step)) {
        (void)Fail(train_, "result", true);
        return absl::InternalError("the worker's result came before its frame");
      }
      down.loss = reply.result().loss();
      down.grad_bits = reply.result().grad_bits();
      down.activation = reply.result().activation();
      down.act_bits = reply.result().act_bits();
      if (absl::Status st = CheckResult(down.loss, down.grad_bits, down.act_bits); !st.ok()) {
        (void)Fail(train_, "result", true);
        return st;
      }
      return down;
    } else {
      (void)Fail(train_, "reply", true);
      return absl::InternalError("an unexpected reply from the worker");
    }
  }
  return Fail(train_, "waiting for the gradient");
}

absl::StatusOr<trainer::EvalPiece> WorkerClient::Evaluate(const trainer::UpFrame& up) {
  if (eval_.step != up.step) EndEvaluation();  // a new validation pass: a new stream
  if (!eval_.stream) {
    eval_.context = NewContext();
    eval_.stream =
        rpc::OpenRawStream(channel_.get(), rpc::kWorkerEvaluateMethod, eval_.context.get());
    eval_.step = up.step;
    splitq::v1::EvaluateRequest hello;
    FillHello(&hello, options_, up.step);
    if (!Write(*eval_.stream, hello)) return Fail(eval_, "hello");
  }
  if (!WriteStep<splitq::v1::EvaluateRequest>(*eval_.stream, up, options_.chunk_bytes)) {
    return Fail(eval_, "sending a frame");
  }
  grpc::ByteBuffer raw;
  if (options_.reply_timeout.count() > 0) watch_.Arm(eval_.context.get(), options_.reply_timeout);
  const bool read = eval_.stream->Read(&raw);
  if (watch_.Disarm() && !read) {
    (void)Fail(eval_, "waiting for the result");
    return absl::DeadlineExceededError(
        absl::StrCat("the worker did not answer a validation batch within ",
                     absl::SixDigits(options_.reply_timeout.count() / 1000.0),
                     " s (splitq client --reply-timeout-s)"));
  }
  if (!read) return Fail(eval_, "waiting for the result");
  splitq::v1::EvaluateReply reply;
  if (!rpc::FromByteBuffer(&raw, &reply)) {
    (void)Fail(eval_, "result", true);
    return absl::InternalError("the worker's evaluation result does not parse");
  }
  trainer::EvalPiece piece;
  piece.loss_sum = reply.loss_sum();
  piece.correct = static_cast<int64_t>(reply.correct());
  piece.count = static_cast<int64_t>(reply.count());
  piece.frame = std::move(*reply.mutable_output());
  if (!std::isfinite(piece.loss_sum) || piece.loss_sum < 0 || piece.count < 0 ||
      piece.correct < 0 || piece.correct > piece.count) {
    (void)Fail(eval_, "result", true);
    return absl::InternalError(
        absl::StrCat("the worker's validation result is not possible (loss sum ", piece.loss_sum,
                     ", ", piece.correct, " of ", piece.count, " right)"));
  }
  return piece;
}

void WorkerClient::EndEvaluation() {
  if (eval_.stream) {
    eval_.stream->WritesDone();
    eval_.stream->Finish();
    eval_.stream.reset();
  }
}

void WorkerClient::Close() {
  if (train_.stream) {
    train_.stream->WritesDone();
    train_.stream->Finish();
    train_.stream.reset();
  }
  EndEvaluation();
}

}  // namespace splitq::client
