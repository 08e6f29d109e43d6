#include "engine/gloo/gloo_communicator.h"

#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/file_store.h>
#include <gloo/rendezvous/hash_store.h>
#include <gloo/transport/tcp/device.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <filesystem>
#include <stdexcept>
#include <vector>

namespace sinkscope {
namespace {

std::string Seconds(std::chrono::milliseconds t) {
  char b[32];
  std::snprintf(b, sizeof b, "%.3g s", t.count() / 1000.0);
  return b;
}

// Gloo says "Timed out waiting …" or "… timeout …".
bool IsTimeout(std::string what) {
  for (char& c : what) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return what.find("timed out") != std::string::npos || what.find("timeout") != std::string::npos;
}

// Holds every wait of the rendezvous to the communicator's timeout (Gloo's stores default
// to 30 s and some of its calls pass none).
class TimedStore final : public gloo::rendezvous::Store {
 public:
  TimedStore(std::shared_ptr<gloo::rendezvous::Store> inner, std::chrono::milliseconds timeout)
      : inner_(std::move(inner)), timeout_(timeout) {}
  void set(const std::string& key, const std::vector<char>& data) override { inner_->set(key, data); }
  std::vector<char> get(const std::string& key) override {
    inner_->wait({key}, timeout_);
    return inner_->get(key);
  }
  void wait(const std::vector<std::string>& keys) override { inner_->wait(keys, timeout_); }
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override {
    inner_->wait(keys, std::min(timeout, timeout_));
  }

 private:
  std::shared_ptr<gloo::rendezvous::Store> inner_;
  std::chrono::milliseconds timeout_;
};

// Gloo's store over a Rendezvous. Gloo reports store failures as exceptions; a timeout
// says "timed out" so ConnectGloo maps it to DEADLINE_EXCEEDED.
class RendezvousStore final : public gloo::rendezvous::Store {
 public:
  RendezvousStore(std::shared_ptr<Rendezvous> inner, std::chrono::milliseconds timeout)
      : inner_(std::move(inner)), timeout_(timeout) {}
  void set(const std::string& key, const std::vector<char>& data) override {
    Status st = inner_->Set("gloo/" + key, std::string(data.begin(), data.end()));
    if (!st.ok()) throw std::runtime_error("rendezvous set " + key + ": " + st.message());
  }
  std::vector<char> get(const std::string& key) override {
    auto v = Get(key, timeout_);
    return std::vector<char>(v.begin(), v.end());
  }
  void wait(const std::vector<std::string>& keys) override { wait(keys, timeout_); }
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override {
    const auto deadline = std::chrono::steady_clock::now() + std::min(timeout, timeout_);
    for (const std::string& key : keys) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      Get(key, std::max(left, std::chrono::milliseconds(0)));
    }
  }

 private:
  std::string Get(const std::string& key, std::chrono::milliseconds timeout) {
    StatusOr<std::string> v = inner_->Get("gloo/" + key, timeout);
    if (v.ok()) return *v;
    if (v.status().code() == StatusCode::kDeadlineExceeded) {
      throw std::runtime_error("timed out waiting for rendezvous key " + key + " (" + v.status().message() + ")");
    }
    throw std::runtime_error("rendezvous key " + key + ": " + v.status().message());
  }
  std::shared_ptr<Rendezvous> inner_;
  std::chrono::milliseconds timeout_;
};

class GlooCommunicator final : public Communicator {
 public:
  GlooCommunicator(std::shared_ptr<gloo::Context> context, std::chrono::milliseconds timeout)
      : context_(std::move(context)), timeout_(timeout) {}
  int rank() const override { return context_->rank; }
  int world_size() const override { return context_->size; }
  const char* Name() const override { return "gloo"; }

  Status AllReduceSum(float* data, size_t n) override {
    return Run("all-reduce of " + std::to_string(n) + " floats", [&] {
      gloo::AllreduceOptions opts(context_);
      opts.setOutput(data, n);
      opts.setReduceFunction([](void* a, const void* b, const void* c, size_t k) {
        gloo::sum<float>(a, b, c, k);
      });
      opts.setTag(NextTag());
      opts.setTimeout(timeout_);
      gloo::allreduce(opts);
    });
  }
  Status AllReduceSum(double* data, size_t n) override {
    return Run("all-reduce of " + std::to_string(n) + " doubles", [&] {
      gloo::AllreduceOptions opts(context_);
      opts.setOutput(data, n);
      opts.setReduceFunction([](void* a, const void* b, const void* c, size_t k) {
        gloo::sum<double>(a, b, c, k);
      });
      opts.setTag(NextTag());
      opts.setTimeout(timeout_);
      gloo::allreduce(opts);
    });
  }
  Status Broadcast(void* data, size_t bytes, int root) override {
    return Run("broadcast of " + std::to_string(bytes) + " bytes from rank " + std::to_string(root), [&] {
      gloo::BroadcastOptions opts(context_);
      opts.setOutput(static_cast<char*>(data), bytes);
      opts.setRoot(root);
      opts.setTag(NextTag());
      opts.setTimeout(timeout_);
      gloo::broadcast(opts);
    });
  }
  Status AllGather(const void* send, void* recv, size_t bytes) override {
    return Run("all-gather of " + std::to_string(bytes) + " bytes per rank", [&] {
      gloo::AllgatherOptions opts(context_);
      opts.setInput(const_cast<char*>(static_cast<const char*>(send)), bytes);
      opts.setOutput(static_cast<char*>(recv), bytes * static_cast<size_t>(world_size()));
      opts.setTag(NextTag());
      opts.setTimeout(timeout_);
      gloo::allgather(opts);
    });
  }
  Status Barrier() override {
    return Run("barrier", [&] {
      gloo::BarrierOptions opts(context_);
      opts.setTag(NextTag());
      opts.setTimeout(timeout_);
      gloo::barrier(opts);
    });
  }

 private:
  uint32_t NextTag() { return tag_++; }

  template <typename F>
  Status Run(const std::string& what, F&& body) {
    if (!broken_.ok()) return broken_;
    try {
      body();
      return OkStatus();
    } catch (const gloo::IoException& e) {
      // Timeouts and closed connections: a peer is dead, stuck or gone.
      const std::string why = e.what();
      const bool timeout = IsTimeout(why);
      broken_ = Status(timeout ? StatusCode::kDeadlineExceeded : StatusCode::kUnavailable,
                       what + " on rank " + std::to_string(rank()) + " of " + std::to_string(world_size()) +
                           (timeout ? " timed out after " + Seconds(timeout_) + ": a rank is dead or stuck"
                                    : " failed: a rank went away") +
                           " (gloo: " + why + ")");
    } catch (const std::exception& e) {
      broken_ = InternalError(what + " on rank " + std::to_string(rank()) + " failed (gloo: " + e.what() + ")");
    }
    return broken_;
  }

  std::shared_ptr<gloo::Context> context_;
  std::chrono::milliseconds timeout_;
  uint32_t tag_ = 1;
  Status broken_;  // the first failure: the communicator is not used after it
};

}  // namespace

std::shared_ptr<gloo::rendezvous::Store> MakeInProcessStore() {
  return std::make_shared<gloo::rendezvous::HashStore>();
}

std::shared_ptr<gloo::rendezvous::Store> MakeFolderStore(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  return std::make_shared<gloo::rendezvous::FileStore>(dir);
}

StatusOr<std::unique_ptr<Communicator>> ConnectGloo(const GlooOptions& o, std::shared_ptr<Rendezvous> rendezvous) {
  return ConnectGloo(o, std::make_shared<RendezvousStore>(std::move(rendezvous), o.timeout));
}

StatusOr<std::unique_ptr<Communicator>> ConnectGloo(const GlooOptions& o,
                                                    std::shared_ptr<gloo::rendezvous::Store> store) {
  if (o.world_size < 1 || o.rank < 0 || o.rank >= o.world_size) {
    return InvalidArgumentError("rank " + std::to_string(o.rank) + " is not in a world of " +
                                std::to_string(o.world_size));
  }
  const std::string who = "rank " + std::to_string(o.rank) + " of " + std::to_string(o.world_size);
  try {
    gloo::transport::tcp::attr attr;
    attr.hostname = o.hostname;
    auto device = gloo::transport::tcp::CreateDevice(attr);
    auto context = std::make_shared<gloo::rendezvous::Context>(o.rank, o.world_size);
    context->setTimeout(o.timeout);
    TimedStore timed(std::move(store), o.timeout);
    context->connectFullMesh(timed, device);
    return std::unique_ptr<Communicator>(new GlooCommunicator(context, o.timeout));
  } catch (const std::exception& e) {
    const std::string why = e.what();
    const bool timeout = IsTimeout(why);
    return Status(timeout ? StatusCode::kDeadlineExceeded : StatusCode::kUnavailable,
                  "rendezvous of " + who + (timeout ? " timed out after " + Seconds(o.timeout) +
                                                          ": a rank did not arrive"
                                                    : " failed") +
                      " (gloo: " + why + ")");
  }
}

}  // namespace sinkscope
