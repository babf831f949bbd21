// splitq server: a deadline for a message a callback reactor is waiting to read. gRPC 1.51 lets
// a read message in as far as its 5-byte prefix announces and checks its size limit only once
// it is whole, so a peer that announces much and sends slowly holds that memory; the deadline
// cancels such a call. The coordinator's calls wait for their request with one, the worker's
// sessions for their hello (docs/cluster.md, "Unfinished requests").
//
//   deadline_.Arm(context, std::chrono::milliseconds(10000), [this] { Unref(); });
//   ...  OnReadDone: deadline_.Met();   OnDone: deadline_.Done();
//
// The reactor holds a reference for the alarm: `release` runs exactly once, after the alarm's
// callback has run (fired, or cancelled by Met or Done), and must drop it. The reactor (and this
// object with it) may be deleted inside `release`. Thread-safe; TryCancel may run the reactor's
// OnDone on the calling thread, which is why the lock is recursive.
#pragma once

#include <grpcpp/alarm.h>
#include <grpcpp/server_context.h>

#include <chrono>
#include <functional>
#include <mutex>
#include <utility>

namespace splitq::server {

class ReadDeadline {
 public:
  // At `after` from now, cancels `context` unless Met() or Done() came first. At most once.
  void Arm(grpc::CallbackServerContext* context, std::chrono::milliseconds after,
           std::function<void()> release) {
    {
      std::lock_guard<std::recursive_mutex> lock(mutex_);
      context_ = context;
      pending_ = true;
    }
    alarm_.Set(std::chrono::system_clock::now() + after,
               [this, release = std::move(release)](bool fired) {
                 {
                   std::lock_guard<std::recursive_mutex> lock(mutex_);
                   // Still waiting and gRPC not done yet: the context is alive.
                   if (fired && pending_ && !done_) context_->TryCancel();
                 }
                 release();
               });
  }
  // The awaited message arrived (or the read ended): the deadline no longer applies.
  void Met() {
    bool cancel = false;
    {
      std::lock_guard<std::recursive_mutex> lock(mutex_);
      cancel = pending_;
      pending_ = false;
    }
    if (cancel) alarm_.Cancel();
  }
  // gRPC is done with the call (OnDone): its context must not be touched any more.
  void Done() {
    {
      std::lock_guard<std::recursive_mutex> lock(mutex_);
      done_ = true;
    }
    Met();
  }

 private:
  std::recursive_mutex mutex_;
  grpc::CallbackServerContext* context_ = nullptr;
  bool pending_ = false;  // armed and not yet met (under mutex_)
  bool done_ = false;     // OnDone ran: context_ is gone (under mutex_)
  grpc::Alarm alarm_;
};

}  // namespace splitq::server
