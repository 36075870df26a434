// fault: a filter for tests that injects errors (or silently drops writes, to simulate a crash)
// into the requests passing through it, by rule.
//
// A rule matches a request when the request's operation is in `ops` and its range overlaps
// [offset, offset + bytes) (flush has no range and matches only rules without one). Matching
// requests are counted; from the `nth` on the rule fires. With `once` it fires a single time.
#pragma once

#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "core/node.h"

namespace imgfs {

class Transaction;

namespace fault_op {
inline constexpr uint32_t kRead = 1U << 0;
inline constexpr uint32_t kWrite = 1U << 1;
inline constexpr uint32_t kWriteZeroes = 1U << 2;
inline constexpr uint32_t kDiscard = 1U << 3;
inline constexpr uint32_t kFlush = 1U << 4;
inline constexpr uint32_t kAllWrites = kWrite | kWriteZeroes | kDiscard;
inline constexpr uint32_t kAny = kRead | kAllWrites | kFlush;
}  // namespace fault_op

enum class FaultAction {
    kError,  // fail the request with `errnum`
    kDrop,   // report success without passing the request on (a write lost in a crash)
};

struct FaultRule {
    uint32_t ops = fault_op::kAny;
    int errnum = EIO;
    bool once = false;
    uint64_t nth = 1;
    uint64_t offset = 0;
    uint64_t bytes = std::numeric_limits<uint64_t>::max();
    FaultAction action = FaultAction::kError;
    /// If set, the rule only matches requests made after the driver above signalled this event
    /// (and before it signalled another).
    IoEvent event = IoEvent::kNone;
};

class FaultNode final : public Node {
  public:
    static std::shared_ptr<FaultNode> open(NodeEnv env, std::string name, Transaction* tx,
                                           std::shared_ptr<Node> child);
    FaultNode(NodeEnv env, std::string name);

    [[nodiscard]] const char* driver_name() const override { return "fault"; }

    /// Returns the rule's index (for fired()).
    size_t add_rule(const FaultRule& rule);
    void clear_rules() { rules_.clear(); }
    /// How often rule `index` has fired.
    [[nodiscard]] uint64_t fired(size_t index) const { return rules_.at(index).fired; }
    /// Requests of each kind that reached this node (passed on or not).
    [[nodiscard]] uint64_t count(uint32_t op) const;

    Task<Result<uint64_t>> allocated_bytes() override;
    void on_event(IoEvent event) override { last_event_ = event; }

  protected:
    Task<Status> do_read(uint64_t offset, MutBuf buf) override;
    Task<Status> do_write(uint64_t offset, ConstBuf buf) override;
    Task<Status> do_write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap) override;
    Task<Status> do_discard(uint64_t offset, uint64_t bytes) override;
    Task<Status> do_flush() override;
    Task<Result<BlockStatus>> do_block_status(uint64_t offset, uint64_t bytes) override;
    Task<Status> do_truncate(uint64_t new_size) override;

  private:
    struct RuleState {
        FaultRule rule;
        uint64_t matched = 0;
        uint64_t fired = 0;
    };
    enum class Verdict { kPass, kFail, kDrop };
    // Counts the request against every rule; the first rule that fires decides.
    Verdict judge(uint32_t op, uint64_t offset, uint64_t bytes, int* errnum);
    Error injected(int errnum, const char* op, uint64_t offset) const;
    void sync_from_child();

    std::vector<RuleState> rules_;
    IoEvent last_event_ = IoEvent::kNone;
    uint64_t counts_[5] = {};
};

}  // namespace imgfs
