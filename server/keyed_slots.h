// splitq server: counted places per key (a token id, a peer address) under one lock, for caps
// on what one peer may have in progress at once (worker_service.h: streams waiting for their
// hello per token).
#pragma once

#include <map>
#include <mutex>
#include <string>

namespace splitq::server {

class KeyedSlots {
 public:
  // At most `per_key` places per key and `total` in all (0: no total cap).
  explicit KeyedSlots(int per_key, int total = 0) : per_key_(per_key), total_(total) {}

  // Takes a place for `key`; false (nothing taken) at either cap.
  bool Take(const std::string& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (total_ > 0 && taken_ >= total_) return false;
    int& mine = per_key_taken_[key];
    if (mine >= per_key_) {
      if (mine == 0) per_key_taken_.erase(key);
      return false;
    }
    ++mine;
    ++taken_;
    return true;
  }
  // Gives back a place Take gave for `key`.
  void Release(const std::string& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = per_key_taken_.find(key);
    if (it == per_key_taken_.end()) return;
    --taken_;
    if (--it->second <= 0) per_key_taken_.erase(it);
  }

 private:
  const int per_key_, total_;
  std::mutex mutex_;
  int taken_ = 0;
  std::map<std::string, int> per_key_taken_;
};

}  // namespace splitq::server
