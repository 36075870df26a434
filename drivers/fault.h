// fault: a filter for tests that injects errors (or silently drops writes, to simulate a crash)
// into the requests passing through it, by rule.
//
// A rule matches a request when the request's operation is in `ops` and its range overlaps
// [offset, offset + bytes) (flush has no range and matches only rules without one). Matching
// requests are counted; from the `nth` on the rule fires. With `once` it fires a single time.
// With a `probability` below 1 it fires on a random subset of them (seeded: reproducible).
//
// For faults among many requests in flight (a disk filling up under load), a rule can also
// pass a random prefix of a write on before failing it (a short write, as ENOSPC leaves), and
// the node can hold each request for a random number of scheduler turns (set_jitter) so that
// concurrent requests reach the storage and complete in shuffled order.
#pragma once

#include <cstdint>
#include <limits>
#include <memory>
#include <random>
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
    kShort,  // writes and zeroing: pass a random part of the range on, then fail with errnum
    kLate,   // writes and zeroing: pass the whole range on, then fail with errnum anyway (a
             // write that reached the disk but whose completion reported an error)
    kDelay,  // reads: pass the request on after `delay_ms` (a slow device; the request is
             // already mapped above, so what runs meanwhile can race it). Others pass at once.
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
    /// Fires on this fraction of the requests it would fire on (drawn from the node's seed).
    double probability = 1.0;
    /// kDelay: how long the request waits.
    uint32_t delay_ms = 0;
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
    /// How often any rule has fired since the last clear_rules().
    [[nodiscard]] uint64_t fired_total() const;
    /// Requests of each kind that reached this node (passed on or not).
    [[nodiscard]] uint64_t count(uint32_t op) const;
    /// Seeds the generator behind `probability`, short-write lengths and jitter.
    void set_seed(uint64_t seed) { rng_.seed(seed); }
    /// Holds every request for 0..max_turns scheduler turns before passing it on and again
    /// before completing it. 0 (the default): no holding.
    void set_jitter(uint32_t max_turns) { jitter_turns_ = max_turns; }

    Task<Result<uint64_t>> allocated_bytes() override;
    [[nodiscard]] uint64_t zeros_from() const override {
        return child(ChildRole::kFiltered)->node()->zeros_from();
    }
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
    enum class Verdict { kPass, kFail, kDrop, kShort, kLate, kDelay };
    // Counts the request against every rule; the first rule that fires decides.
    Verdict judge(uint32_t op, uint64_t offset, uint64_t bytes, int* errnum);
    uint32_t last_delay_ms_ = 0;  // of the last kDelay verdict; read at once by its request
    Error injected(int errnum, const char* op, uint64_t offset) const;
    // The part of [offset, offset + bytes) a short write passes on: whole blocks, less than all.
    uint64_t short_length(uint64_t bytes);
    Task<void> jitter();
    void sync_from_child();

    std::vector<RuleState> rules_;
    IoEvent last_event_ = IoEvent::kNone;
    uint64_t counts_[5] = {};
    std::mt19937_64 rng_{1};
    uint32_t jitter_turns_ = 0;
};

}  // namespace imgfs
