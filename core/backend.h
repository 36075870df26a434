// BlockBackend: the root user of a chain (the FUSE export of NAME.raw, or a test). Its requests
// wait while a drained section holds the chain, and are counted while in flight. Everything a
// user of the image asks of it goes through here, block status included, so a drained section
// (snapshot, job switch, export removal) sees every request.
#pragma once

#include <string>

#include "core/chain_status.h"
#include "core/co_mutex.h"
#include "core/node.h"

namespace imgfs {

class Transaction;

/// The last request of a backend that failed, as its user saw it: a disk that filled up or
/// went bad shows in status and info. On a full disk, writes into space already allocated go
/// on succeeding while allocating ones fail, so a success does not end the condition; a quiet
/// period without failures does (kQuietS).
struct IoFailure {
    static constexpr int64_t kQuietS = 30;
    int errnum = 0;  // 0: nothing has failed
    std::string op;  // "read", "write", "write-zeroes", "discard", "flush", "truncate"
    std::string message;
    uint64_t failed = 0;       // requests failed since the backend was made
    int64_t since_unix_s = 0;  // first failure of the current run (no kQuietS gap in it)
    int64_t last_unix_s = 0;   // latest failure
    [[nodiscard]] bool ongoing(int64_t now_unix_s) const {
        return errnum != 0 && now_unix_s - last_unix_s < kQuietS;
    }
};

class BlockBackend final : public ChildOwner {
  public:
    BlockBackend(Executor* executor, std::string name)
        : ChildOwner(executor), name_(std::move(name)), claim_mutex_(executor) {}

    /// Attaches the backend to `node` with `perm`, sharing `shared` (in `tx`).
    Child* attach(Transaction* tx, std::shared_ptr<Node> node, Perms perm, Perms shared);

    [[nodiscard]] std::string owner_name() const override { return "backend " + name_; }
    [[nodiscard]] const std::string& name() const { return name_; }
    [[nodiscard]] Child* root() const { return child(ChildRole::kUser); }
    [[nodiscard]] Node* root_node() const { return root() != nullptr ? root()->node() : nullptr; }
    [[nodiscard]] uint64_t size() const { return root_node() != nullptr ? root_node()->size() : 0; }
    [[nodiscard]] bool writable() const;

    Task<Status> read(uint64_t offset, MutBuf buf);
    /// read() for data no client asked for yet (fuse/read_ahead.h): a failure is not recorded
    /// in io_failure(), since no user saw it; the read the client then makes will.
    Task<Status> read_ahead(uint64_t offset, MutBuf buf);
    Task<Status> write(uint64_t offset, ConstBuf buf);
    Task<Status> write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap);
    Task<Status> discard(uint64_t offset, uint64_t bytes);
    Task<Status> flush();
    Task<Status> truncate(uint64_t new_size);
    /// What the whole chain shows at `offset` (offset < size(), bytes > 0), looking through a
    /// filter a job has put over the top layer. Depths count from the top layer.
    Task<Result<ChainStatus>> block_status_above(uint64_t offset, uint64_t bytes);

    /// Whether the chain must be claimed (claim_writes()) before it is written.
    [[nodiscard]] bool claim_pending() const {
        return root_node() != nullptr && root_node()->claim_pending();
    }
    /// Makes this host the writer of the chain's top (Node::claim_writes) in a drained
    /// section, so that what the top rereads is not in use. A user that changes the graph
    /// (jobs/) calls it holding what serialises its graph changes (the export's ops lock)
    /// before its first write; the write requests call it too, for a top that a graph change
    /// brought back unclaimed meanwhile. For a request (`for_request`), a failure is recorded
    /// as a failed `op` (status then names the host that writes the image); a command's refusal
    /// is its own error, not an I/O failure of the image. True if this call took the claim.
    Task<Result<bool>> claim_writes(std::string op, bool for_request = true);
    /// Gives back a claim claim_writes() newly took (true) for a command that was then refused,
    /// unless something was written under it meanwhile (Node::release_claim), in a drained
    /// section of its own.
    Task<Status> release_claim();

    /// From now on every request fails with EIO naming `reason`: the image is in a state a
    /// failed graph change could not undo, and serving it could return wrong data.
    void fence(std::string reason);
    [[nodiscard]] bool fenced() const { return !fence_reason_.empty(); }
    [[nodiscard]] const std::string& fence_reason() const { return fence_reason_; }

    [[nodiscard]] const IoFailure& io_failure() const { return io_failure_; }

    /// Changes whenever what a read returns may change: when a write, write-zeroes, discard or
    /// truncate is admitted and when it ends, and when a drained section (a snapshot, revert,
    /// job switch or removal: every graph change) begins and ends. Data a reader keeps may be
    /// reused only while this is what it was when the data was read, and only if no such
    /// request was in flight then (writes_in_flight()).
    [[nodiscard]] uint64_t content_generation() const { return content_generation_; }
    [[nodiscard]] uint32_t writes_in_flight() const { return writes_in_flight_; }

    // Open files on the export; revert is refused while any is open.
    void open_file() { ++open_count_; }
    void release_file() { --open_count_; }
    [[nodiscard]] int open_count() const { return open_count_; }

  protected:
    void on_drained_begin() override { ++content_generation_; }
    void on_drained_end() override { ++content_generation_; }

  private:
    /// A request that changes content, from its admission to its end (content_generation()).
    class ContentChange {
      public:
        explicit ContentChange(BlockBackend* b) : backend_(b) {
            ++backend_->writes_in_flight_;
            ++backend_->content_generation_;
        }
        ContentChange(const ContentChange&) = delete;
        ContentChange& operator=(const ContentChange&) = delete;
        ~ContentChange() {
            --backend_->writes_in_flight_;
            ++backend_->content_generation_;
        }

      private:
        BlockBackend* backend_;
    };

    /// Waits while drained, then checks that there is an image to serve.
    Task<Status> enter();
    /// enter() for a request that writes: also requires the chain writable and claimed,
    /// claiming it if needed. Returns with no drain under way, so the caller's InFlightGuard,
    /// taken without suspending, keeps later drains waiting for the request.
    Task<Status> enter_for_write(const char* op);
    Status check_writable() const;
    /// Records a request's outcome in io_failure_ and passes it on.
    Status note(const char* op, Status st);
    /// ENOSPC if [offset, offset + bytes) is not within size() any more.
    Status refuse_past_end(uint64_t offset, uint64_t bytes, const char* op);

    std::string name_;
    CoMutex claim_mutex_;  // one claim at a time: the others wait and find it done
    std::string fence_reason_;
    int open_count_ = 0;
    IoFailure io_failure_;
    uint64_t content_generation_ = 0;
    uint32_t writes_in_flight_ = 0;
};

}  // namespace imgfs
