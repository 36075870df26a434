// MirrorFilter: the node a commit or stream job puts between the export and the top layer for
// its lifetime. Every guest write passes through it and is tracked in its RangeLock, so the job
// can exclude guest writes from a range it copies (a serialising request); and, for a commit,
// it records what the guest changed (async mode) or also writes it to the commit target
// (synchronous mode, which is what makes an active commit converge under a steady writer).
#pragma once

#include <memory>

#include "core/node.h"
#include "core/range_lock.h"
#include "core/wait_queue.h"
#include "jobs/dirty_bitmap.h"

namespace imgfs {

class Transaction;

class MirrorFilter final : public Node {
  public:
    enum class Mode {
        kTrack,  // writes only tracked (stream)
        kAsync,  // writes marked dirty after they complete
        kSync,   // writes also go to the target before they complete
    };

    /// Creates the filter over `top` (in `tx`); the caller then moves the export onto it.
    static std::shared_ptr<MirrorFilter> create(NodeEnv env, std::string name, Transaction* tx,
                                                std::shared_ptr<Node> top);
    MirrorFilter(NodeEnv env, std::string name);

    [[nodiscard]] const char* driver_name() const override { return "mirror"; }
    void child_perm(const Child& child, Perms node_perm, Perms node_shared, Perms* perm,
                    Perms* shared) const override;

    /// Writes that begin after this run in `mode`; those already running keep theirs.
    void set_mode(Mode mode) { mode_ = mode; }
    /// Waits until no write that began before the switch to sync mode is running (each has
    /// marked its range dirty by then). Writes that begin meanwhile do not hold it up.
    Task<void> wait_unmirrored_writes();
    [[nodiscard]] Mode mode() const { return mode_; }
    /// Where dirty ranges are recorded (async and sync modes).
    void set_dirty(DirtyBitmap* dirty) { dirty_ = dirty; }
    /// The edge writes are mirrored through in sync mode (the job's edge to the target).
    void set_target(Child* target) { target_ = target; }
    [[nodiscard]] RangeLock* tracker() { return &tracker_; }
    /// Writes that reached the top but could not be mirrored to the target (sync mode).
    [[nodiscard]] uint64_t mirror_failures() const { return mirror_failures_; }
    [[nodiscard]] Child* top() const { return child(ChildRole::kFiltered); }

  protected:
    Task<Status> do_read(uint64_t offset, MutBuf buf) override;
    Task<Status> do_write(uint64_t offset, ConstBuf buf) override;
    Task<Status> do_write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap) override;
    Task<Status> do_discard(uint64_t offset, uint64_t bytes) override;
    Task<Status> do_flush() override;
    Task<Result<BlockStatus>> do_block_status(uint64_t offset, uint64_t bytes) override;
    Task<Status> do_truncate(uint64_t new_size) override;
    Task<Status> do_close() override;

  private:
    Mode begin_write();
    void end_write(Mode mode);
    void after_write(Mode mode, const Status& st, uint64_t offset, uint64_t bytes,
                     const Status& mirrored);

    Mode mode_ = Mode::kTrack;
    DirtyBitmap* dirty_ = nullptr;
    Child* target_ = nullptr;
    RangeLock tracker_;
    uint64_t unmirrored_in_flight_ = 0;  // writes that began before sync mode
    uint64_t mirror_failures_ = 0;
    WaitQueue unmirrored_done_;
};

/// Takes `filter` out from over `top` again in a drained section and detaches `job_edge` (the
/// job's own edge below it) in the same transaction. It only restores the graph the filter was
/// inserted into, so it fails only if the world changed meanwhile (another process took an
/// image lock); the caller then fences the image rather than serve a graph it cannot trust.
Task<Status> remove_mirror_filter(Graph* graph, std::shared_ptr<MirrorFilter> filter,
                                  std::shared_ptr<Node> top, Child* job_edge);

}  // namespace imgfs
