// Drained sections: while one is held on a node, everything that could send the node new
// requests (its parents, up to backends and jobs) is quiesced, and nothing is in flight on the
// node, on what is above it, or on what is below it (except a layer below that another
// image's overlay also uses, which keeps serving it). Graph changes happen inside one.
#pragma once

#include <memory>
#include <vector>

#include "core/node.h"
#include "core/task.h"

namespace imgfs {

class [[nodiscard]] DrainGuard {
  public:
    DrainGuard() = default;
    explicit DrainGuard(std::vector<std::shared_ptr<Node>> nodes) : nodes_(std::move(nodes)) {}
    DrainGuard(DrainGuard&& o) noexcept = default;
    DrainGuard& operator=(DrainGuard&& o) noexcept;
    DrainGuard(const DrainGuard&) = delete;
    DrainGuard& operator=(const DrainGuard&) = delete;
    ~DrainGuard() { end(); }

    /// Ends the drained section early (new requests may flow again).
    void end();

  private:
    std::vector<std::shared_ptr<Node>> nodes_;
};

/// Begins a drained section on every node in `nodes` (one quiesce for all, as a group snapshot
/// needs) and waits until they are quiet. The holder may itself issue requests meanwhile.
Task<DrainGuard> drain(std::vector<std::shared_ptr<Node>> nodes);

/// True if `owner` or anything above or below it has requests in flight.
bool drain_busy(ChildOwner* owner);

}  // namespace imgfs
