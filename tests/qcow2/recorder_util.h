// Crash-harness helpers: a file-layer filter that records what reaches the storage, the crash
// states that recording allows, an in-memory storage node, and a qcow2 consistency checker that
// works on image bytes in memory (much cheaper than `qemu-img check`, so it can run on every crash
// point while qemu-img runs on a sample).
//
// Model of a crash. Every event (a request issued, a request completed) takes a number from one
// Clock. A request is durable once a flush that was issued after it completed has itself
// completed. A crash at clock value `s` leaves, per file: the content when recording began, plus
// every request durable by `s`, plus any selection of the requests issued before `s` that are not
// durable yet (dropped, kept, or a multi-sector write torn at 512-byte sectors), applied in issue
// order. Concurrent overlapping writes are not modelled (qcow2 serialises them).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <unordered_set>
#include <vector>

#include "core/node.h"

namespace imgfs {
class Transaction;
}

namespace imgfs::test {

/// Hands out event numbers; `on_issue` (if set) runs when a request is issued, before it is
/// passed on (a crash point; the jobs harness records directory state there).
class Clock {
  public:
    uint64_t next() { return ++now_; }
    [[nodiscard]] uint64_t now() const { return now_; }
    std::function<void(uint64_t seq)> on_issue;

  private:
    uint64_t now_ = 0;
};

struct RecordedOp {
    enum Kind : uint8_t { kWrite, kZero, kTruncate, kFlush };
    Kind kind = kWrite;
    uint64_t offset = 0;  // kTruncate: the new size
    uint64_t bytes = 0;
    std::vector<uint8_t> data;  // kWrite
    uint64_t issued = 0;
    uint64_t done = UINT64_MAX;  // kFlush: only if it succeeded
};

/// One file's history since recording began.
struct Journal {
    std::string name;
    std::vector<uint8_t> initial;
    std::vector<RecordedOp> ops;  // in issue order
};

/// Which pending (not yet durable) requests a crash variant keeps.
enum class Variant { kNone, kPrefix, kSubset, kTorn };
inline constexpr Variant kAllVariants[] = {Variant::kNone, Variant::kPrefix, Variant::kSubset,
                                           Variant::kTorn};
const char* variant_name(Variant v);

/// Per pending request: kept whole (~0), dropped (0), or torn (bit i: sector i kept, up to 64
/// sectors; a longer write torn keeps sectors by the bit of i % 64).
using Selection = std::vector<uint64_t>;

/// The file content a crash leaves. Works through crash points in increasing clock order with
/// an incrementally maintained durable base.
class CrashView {
  public:
    explicit CrashView(const Journal* journal) : j_(journal), base_(journal->initial) {}
    /// Moves to crash point `s` (non-decreasing). Returns the indices of pending requests.
    const std::vector<size_t>& seek(uint64_t s);
    [[nodiscard]] const std::vector<size_t>& pending() const { return pending_; }
    /// A selection of the pending requests for `v` (kTorn tears one multi-sector write).
    Selection choose(Variant v, std::mt19937_64* rng) const;
    /// The content with that selection applied.
    [[nodiscard]] std::vector<uint8_t> content(const Selection& sel) const;
    /// A key identifying the resulting state (durable cut + selection), for de-duplication.
    [[nodiscard]] std::string key(const Selection& sel) const;

  private:
    const Journal* j_;
    std::vector<uint8_t> base_;
    uint64_t cut_ = 0;           // requests done before this are durable (and in base_)
    std::vector<bool> applied_;  // per op: in base_
    size_t scan_from_ = 0;       // every op before it is settled
    std::vector<size_t> pending_;
};

/// Applies one recorded request (optionally torn by `sector_mask`) to content.
void apply_op(const RecordedOp& op, std::vector<uint8_t>* content, uint64_t sector_mask = ~0ULL);

/// A filter that records every write, zeroing, discard (recorded as zeroing: the file layer
/// punches holes) and truncate into a Journal, and the flushes that succeeded.
class RecorderNode final : public Node {
  public:
    /// Reads the child's whole content as the journal's initial state.
    static Task<Result<std::shared_ptr<RecorderNode>>> open(NodeEnv env, std::string name,
                                                            std::shared_ptr<Node> child,
                                                            Clock* clock, Journal* journal);
    /// The same inside a caller's transaction, with the initial content already known.
    static std::shared_ptr<RecorderNode> attach(NodeEnv env, std::string name, Transaction* tx,
                                                std::shared_ptr<Node> child, Clock* clock,
                                                Journal* journal);
    RecorderNode(NodeEnv env, std::string name) : Node(env, std::move(name)) {}
    [[nodiscard]] const char* driver_name() const override { return "recorder"; }
    void on_event(IoEvent event) override;
    Task<Result<uint64_t>> allocated_bytes() override;
    [[nodiscard]] uint64_t zeros_from() const override {
        return child(ChildRole::kFiltered)->node()->zeros_from();
    }

  protected:
    Task<Status> do_read(uint64_t offset, MutBuf buf) override;
    Task<Status> do_write(uint64_t offset, ConstBuf buf) override;
    Task<Status> do_write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap) override;
    Task<Status> do_discard(uint64_t offset, uint64_t bytes) override;
    Task<Status> do_flush() override;
    Task<Result<BlockStatus>> do_block_status(uint64_t offset, uint64_t bytes) override;
    Task<Status> do_truncate(uint64_t new_size) override;

  private:
    size_t issue(RecordedOp op);
    void sync_from_child();
    Clock* clock_ = nullptr;
    Journal* journal_ = nullptr;
};

/// Storage in memory that grows on writes past its end and reads zeros where punched.
class VecNode final : public Node {
  public:
    VecNode(NodeEnv env, std::string name, std::vector<uint8_t> bytes);
    [[nodiscard]] const char* driver_name() const override { return "vec"; }
    // Writes land whole: nothing lies past the end.
    [[nodiscard]] uint64_t zeros_from() const override { return data.size(); }
    std::vector<uint8_t> data;

  protected:
    Task<Status> do_read(uint64_t offset, MutBuf buf) override;
    Task<Status> do_write(uint64_t offset, ConstBuf buf) override;
    Task<Status> do_write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap) override;
    Task<Status> do_discard(uint64_t offset, uint64_t bytes) override;
    Task<Status> do_flush() override { co_return Status{}; }
    Task<Status> do_truncate(uint64_t new_size) override;
};

/// What our checker found in a qcow2 image held in memory. Counted as `qemu-img check` counts:
/// a cluster whose refcount is below its references, a table entry that is malformed or points
/// outside the file, a COPIED flag that disagrees with the refcount: corruptions; a refcount
/// above the references: a leak. With the dirty bit set (lazy refcounts) refcounts may lag by
/// design, so only the tables' own soundness is checked.
struct ImageCheck {
    uint64_t corruptions = 0;
    uint64_t leaks = 0;
    bool dirty = false;
    std::string first_problem;
};
ImageCheck check_qcow2(const std::vector<uint8_t>& image);

/// Crash-harness scale from the environment: IMGFS_LONG=1 multiplies the work, and
/// IMGFS_CRASH_STRIDE=N (set by the sanitizer run) keeps every Nth crash point only.
struct CrashScale {
    bool long_mode = false;
    uint64_t stride = 1;
};
CrashScale crash_scale();

}  // namespace imgfs::test
