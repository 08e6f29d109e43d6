// A Rendezvous kept in memory (as the coordinator keeps a gang's), for tests of the
// communicators.
#pragma once

#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "engine/communicator.h"

namespace sinkscope {

class MemoryRendezvous final : public Rendezvous {
 public:
  Status Set(const std::string& key, const std::string& value) override {
    std::lock_guard<std::mutex> lock(mu_);
    values_[key] = value;
    cv_.notify_all();
    return OkStatus();
  }
  StatusOr<std::string> Get(const std::string& key, std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> lock(mu_);
    if (!cv_.wait_for(lock, timeout, [&] { return values_.count(key) > 0; })) {
      return Status(StatusCode::kDeadlineExceeded, "no value for " + key);
    }
    return values_.at(key);
  }
  bool Has(const std::string& key) {
    std::lock_guard<std::mutex> lock(mu_);
    return values_.count(key) > 0;
  }
  std::vector<std::string> Keys() {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::string> keys;
    for (const auto& [k, v] : values_) keys.push_back(k);
    return keys;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, std::string> values_;
};

}  // namespace sinkscope
