// rbd_node: an RBD image as a protocol node, the way FileNode is a file. Data requests are
// librbd's asynchronous calls; their completions come back through an eventfd the image
// signals (rbd_set_image_notification), which a read on the event loop's ring waits on, and are
// collected with rbd_poll_io_events on the loop. So no coroutine resumes on librbd's threads.
// The few librbd calls that have no asynchronous form (resize, rbd_diff_iterate2) run on the
// pool's offload thread. (rbd_diff_iterate2 calls collect_extent on librados's threads, one
// call at a time, and its return orders them before the offload thread reads the extents.)
// Every call is bounded by the cluster deadline (see rados.h).
#pragma once

#include <coroutine>
#include <memory>
#include <string>

#include "core/co_mutex.h"
#include "core/node.h"
#include "core/unique_fd.h"
#include "drivers/rbd/rados.h"

namespace imgfs {

class RbdNode final : public Node {
  public:
    /// Serves `image` (already open, read-only or not, holding `lock` of its exclusive lock),
    /// whose size the opener read (`size_bytes`: asking here, on the loop, could be a round
    /// trip to the cluster). Registers the completion eventfd.
    static Result<std::shared_ptr<RbdNode>> open(NodeEnv env, std::string name, RbdImage image,
                                                 RbdLock lock, uint64_t size_bytes);

    RbdNode(NodeEnv env, std::string name, RbdImage image, UniqueFd event_fd, RbdLock lock);
    /// Closes the image if close() did not (no request is in flight by then: close() drained
    /// the node), blocking the loop up to the deadline.
    ~RbdNode() override;

    [[nodiscard]] const char* driver_name() const override { return "rbd"; }
    [[nodiscard]] uint64_t zeros_from() const override { return zeros_from_; }
    void describe(JsonWriter* out) const override;
    void expect_writes() override;
    [[nodiscard]] bool claim_pending() const override { return lock_ == RbdLock::kPending; }
    /// Takes the exclusive lock (on the offload thread) and rereads the size, which another
    /// host may have changed while this one only read. Writes call it too, so a raw image
    /// needs nothing above it; a format node above must call it first (see Node).
    Task<Result<bool>> claim_writes() override;
    /// Releases the lock claim_writes() took (on the offload thread) unless a write was issued
    /// since; zeros_from() is unknown again until the next claim, which rereads the size.
    Task<Status> release_claim() override;

  protected:
    Task<Status> do_read(uint64_t offset, MutBuf buf) override;
    Task<Status> do_write(uint64_t offset, ConstBuf buf) override;
    Task<Status> do_write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap) override;
    Task<Status> do_discard(uint64_t offset, uint64_t bytes) override;
    Task<Status> do_flush() override;
    Task<Status> do_truncate(uint64_t new_size) override;
    /// From the image's object listing (rbd_diff_iterate2, on the offload thread): written
    /// extents are data, the rest reads as zeros. Looks at most 64 MiB ahead per call.
    Task<Result<BlockStatus>> do_block_status(uint64_t offset, uint64_t bytes) override;
    /// Flushes, gives back the room grown ahead (see grow_to()), and closes the image on the
    /// offload thread.
    Task<Status> do_close() override;

  private:
    // One librbd request: its completion's argument, alive in the waiting coroutine's frame.
    struct Op {
        ssize_t result = 0;
        bool done = false;
        std::coroutine_handle<> parked;  // set while parked (see wait())
        Op* next_parked = nullptr;
    };
    struct Park;

    /// A completion whose argument is `op`, or an error (out of memory).
    Result<rbd_completion_t> completion(Op* op, const char* what) const;
    /// Waits for `op`, which was handed to librbd. One waiter at a time reads the eventfd and
    /// completes every finished request; the others are parked until theirs is done or the
    /// reader leaves and hands the reading to one of them.
    Task<void> wait(Op* op);
    Task<void> poll_events();
    void complete_finished();
    void unpark(Op* op);
    /// Starts a request with `issue(completion)` and waits for it; the request's result.
    template <typename Issue>
    Task<Result<ssize_t>> run(const char* what, uint64_t offset, uint64_t bytes, Issue issue);
    /// Makes the node at least `end` bytes long (writes past the end need room first). The RBD
    /// image grows ahead of the node in steps, because a resize is a round trip to the cluster
    /// and a qcow2 image appends one cluster at a time.
    Task<Status> grow_to(uint64_t end);
    /// Resizes the RBD image (not the node's size). Caller holds resize_mutex_.
    Task<Status> resize_image(uint64_t new_size, bool allow_shrink);
    Error op_error(ssize_t result, const char* what, uint64_t offset, uint64_t bytes) const;
    /// EIO for `what`, not asked of a cluster that stopped answering while closing.
    Error skipped_error(const std::string& what) const;

    RbdImage image_;
    RbdLock lock_;
    UniqueFd event_fd_;
    CoMutex resize_mutex_;  // also serialises claim_writes()
    uint64_t in_flight_ = 0;
    // Grows that failed, and the last one's error: writes that waited behind a failed grow
    // fail with it instead of trying again one after the other.
    uint64_t grow_failures_ = 0;
    Error last_grow_error_;
    bool polling_ = false;
    bool eventfd_failed_ = false;  // said once; completions are polled for since
    bool claimed_ = false;         // claim_writes() ran: something may have been written
    uint64_t writes_issued_ = 0;   // write, write-zeroes, discard and truncate requests begun
    // writes_issued_ when claim_writes() last took the lock: release_claim() gives the lock
    // back only while the two are equal (nothing was written under it).
    uint64_t writes_at_claim_ = 0;
    Op* parked_head_ = nullptr;  // parked waiters, most recent first
    // No byte at or past this offset was ever written (see Node::zeros_from()). Unknown
    // (UINT64_MAX) until the lock is taken: another host may be writing the image.
    uint64_t zeros_from_ = 0;
    // The RBD image's size: at least size_, the rest being zeros grown ahead. A crash leaves
    // that tail behind, which a qcow2 image tolerates as unreferenced space.
    uint64_t image_size_ = 0;
};

}  // namespace imgfs
