// The CPU ranks' communicator over Gloo's TCP transport (Debian libgloo). Ranks meet
// through a rendezvous store: in-process (the ranks of sinkscope-train --ranks N, tests),
// a shared folder (ranks of one node in separate processes), or any Rendezvous (the
// service's goes through the coordinator). Each collective runs with `timeout`.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "engine/communicator.h"

namespace gloo::rendezvous {
class Store;
}

namespace sinkscope {

struct GlooOptions {
  int rank = 0;
  int world_size = 1;
  // The address this rank listens on for its peers ("127.0.0.1" on one machine).
  std::string hostname = "127.0.0.1";
  // Of the rendezvous and of every collective.
  std::chrono::milliseconds timeout{30000};
};

// An in-process rendezvous store shared by the ranks of one process.
std::shared_ptr<gloo::rendezvous::Store> MakeInProcessStore();
// A rendezvous store in a folder every rank can reach (one key per file).
std::shared_ptr<gloo::rendezvous::Store> MakeFolderStore(const std::string& dir);

// Joins the gang: waits (up to options.timeout) until every rank has arrived. A rank
// that does not come is DEADLINE_EXCEEDED naming the ranks present.
StatusOr<std::unique_ptr<Communicator>> ConnectGloo(const GlooOptions& options,
                                                    std::shared_ptr<gloo::rendezvous::Store> store);
// The same through a Rendezvous; keys are prefixed with "gloo/".
StatusOr<std::unique_ptr<Communicator>> ConnectGloo(const GlooOptions& options, std::shared_ptr<Rendezvous> rendezvous);

}  // namespace sinkscope
