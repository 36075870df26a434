// The block graph: nodes (driver state), child edges with a role and permissions, and the owners
// of edges (nodes, block backends, jobs).
//
//   BlockBackend "vm1"            the export's root user
//        |  (user edge: consistent-read|write|resize)
//   Node qcow2 "vm1.qcow2" ---backing---> Node qcow2 "base.qcow2" --file--> Node file
//        | file
//   Node file "vm1.qcow2"
//
// A Node's public I/O entry points (read, write, ...) are the generic request layer
// (core/node_io.cc): bounds, alignment, splitting, tracking. Drivers implement the protected do_*
// entry points and see only requests that already satisfy the node's Limits.
//
// Threading: all of this lives on one event-loop thread.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/buffer.h"
#include "core/perm.h"
#include "core/range_lock.h"
#include "core/result.h"
#include "core/task.h"
#include "core/wait_queue.h"

namespace imgfs {

class EventLoop;
class Graph;
class Logger;
class Node;
class Child;
class JsonWriter;

enum class ChildRole {
    kFile,      // the storage a format driver keeps its image in
    kBacking,   // the layer whose data shows through where this one has none
    kFiltered,  // a filter's single child (same content)
    kUser,      // an edge from a backend or a job (not from a node)
};
const char* child_role_name(ChildRole role);

/// What a driver requires of requests. The generic layer guarantees these to the driver.
struct Limits {
    /// Offsets and lengths of do_read/do_write/do_write_zeroes/do_discard are multiples of this.
    uint32_t request_alignment = 1;
    /// Buffers passed to do_read/do_write start at a multiple of this.
    uint32_t memory_alignment = 1;
    /// do_read/do_write never get more bytes than this (a multiple of request_alignment).
    uint64_t max_transfer = 64ULL << 20;
    /// Overlapping writes are never in flight at the same time.
    bool serialise_writes = false;
    /// do_write_zeroes ranges start and end on multiples of this too (a driver that zeroes
    /// whole clusters); the generic layer writes zero buffers for the unaligned head and tail.
    uint64_t zero_alignment = 1;
};

/// Optional driver entry points, as data: the generic layer emulates or skips what is absent
/// instead of calling and getting ENOTSUP.
struct Capabilities {
    bool write_zeroes = false;  // do_write_zeroes (otherwise: zero buffers are written)
    bool discard = false;       // do_discard (otherwise: discard is a no-op)
    bool block_status = false;  // do_block_status (otherwise: everything is data)
    bool resize = false;        // do_truncate
    /// The format records the name of a backing file (backing_file_name, set_backing_name).
    /// Callers check this instead of asking a driver without the field and reading ENOTSUP.
    bool backing_name = false;
};

/// What one layer says about a range.
enum class Alloc {
    kData,         // this layer holds data for the range
    kZero,         // this layer reads the range as zeros (allocated as zero, or a hole)
    kUnallocated,  // this layer does not say; the backing layer's content shows through
};
struct BlockStatus {
    Alloc alloc = Alloc::kData;
    uint64_t bytes = 0;  // length of the run starting at the queried offset, > 0
};

/// Steps of a driver's work that a fault-injection filter below it can key on. A driver
/// signals one on its storage edge right before the I/O of that step.
enum class IoEvent : uint8_t {
    kNone,
    kDataRead,       // guest data read
    kDataWrite,      // guest data written in place or into new clusters
    kCowRead,        // old content read for copy-on-write
    kCowWrite,       // new clusters written with copy-on-write data
    kHeader,         // image header update
    kL1,             // L1 table entry or table
    kL2Write,        // cached L2 tables written back
    kL2Alloc,        // a new (or copied) L2 table written
    kRefblockWrite,  // cached refcount blocks written back
    kRefblockAlloc,  // new refcount blocks written
    kRefTableGrow,   // the refcount table grown (new table, then header switch)
};
const char* io_event_name(IoEvent e);
/// The event named `name` ("l2-write"), or kNone.
IoEvent io_event_from_name(std::string_view name);

struct NodeEnv {
    EventLoop* loop = nullptr;
    Logger* log = nullptr;
    Graph* graph = nullptr;
};

/// The parent side of edges: a Node, a BlockBackend or a Job. Owns its child edges, counts the
/// requests it has in flight, and can be quiesced by a drained section below it.
class ChildOwner {
  public:
    explicit ChildOwner(Executor* executor);
    ChildOwner(const ChildOwner&) = delete;
    ChildOwner& operator=(const ChildOwner&) = delete;
    virtual ~ChildOwner();

    /// For permission-conflict messages: "backend vm1", "commit job 3", "vm1.qcow2".
    [[nodiscard]] virtual std::string owner_name() const = 0;
    virtual Node* as_node() { return nullptr; }

    [[nodiscard]] const std::vector<std::unique_ptr<Child>>& children() const { return children_; }
    /// The first child edge with `role`, or null.
    [[nodiscard]] Child* child(ChildRole role) const;

    /// A node below was drained: issue no new requests until the matching drained_end.
    void drained_begin();
    void drained_end();
    [[nodiscard]] bool quiesced() const { return quiesce_counter_ > 0; }
    /// Suspends while quiesced. New requests from this owner pass through here first.
    Task<void> wait_unquiesced();

    void inc_in_flight() {
        if (++in_flight_ > max_in_flight_) {
            max_in_flight_ = in_flight_;
        }
    }
    void dec_in_flight();
    [[nodiscard]] uint64_t in_flight() const { return in_flight_; }
    /// The most requests ever in flight at once (statistics).
    [[nodiscard]] uint64_t max_in_flight() const { return max_in_flight_; }
    /// Suspends until in_flight() has been 0 at least once since the call.
    [[nodiscard]] WaitQueue::Waiter wait_idle() { return idle_.wait(); }

  protected:
    // Nodes forward quiescing to their own parents.
    virtual void on_drained_begin() {}
    virtual void on_drained_end() {}

  private:
    friend class Transaction;
    friend class Child;
    std::vector<std::unique_ptr<Child>> children_;
    uint64_t in_flight_ = 0;
    uint64_t max_in_flight_ = 0;
    int quiesce_counter_ = 0;
    WaitQueue idle_;
    WaitQueue unquiesced_;
};

/// Counts one request in flight on an owner for the guard's lifetime.
class InFlightGuard {
  public:
    explicit InFlightGuard(ChildOwner* owner) : owner_(owner) { owner_->inc_in_flight(); }
    InFlightGuard(const InFlightGuard&) = delete;
    InFlightGuard& operator=(const InFlightGuard&) = delete;
    ~InFlightGuard() { owner_->dec_in_flight(); }

  private:
    ChildOwner* owner_;
};

class Node : public ChildOwner {
  public:
    Node(NodeEnv env, std::string name);
    ~Node() override;

    [[nodiscard]] const std::string& name() const { return name_; }
    [[nodiscard]] virtual const char* driver_name() const = 0;
    [[nodiscard]] uint64_t size() const { return size_; }
    [[nodiscard]] const Limits& limits() const { return limits_; }
    [[nodiscard]] const Capabilities& caps() const { return caps_; }
    [[nodiscard]] bool read_only() const { return read_only_; }
    [[nodiscard]] const NodeEnv& env() const { return env_; }
    [[nodiscard]] const std::vector<Child*>& parents() const { return parents_; }
    [[nodiscard]] Child* backing() const { return child(ChildRole::kBacking); }
    [[nodiscard]] Child* file() const { return child(ChildRole::kFile); }
    [[nodiscard]] Perms cumulative_perm() const { return cumulative_perm_; }
    [[nodiscard]] Perms cumulative_shared() const { return cumulative_shared_; }
    [[nodiscard]] bool closed() const { return closed_; }

    // ---- Generic request layer (core/node_io.cc) ----
    // Callers: edges (Child), which check permissions, and the code holding a drain.
    // Any offset/length is accepted; a range ending past 2^63 - 1 fails with EINVAL.

    /// Reads; bytes past size() read as zeros.
    Task<Status> read(uint64_t offset, MutBuf buf);
    /// Writes. Past size() only if the driver can resize (the file driver grows the file).
    Task<Status> write(uint64_t offset, ConstBuf buf);
    /// Zeroes a range; `may_unmap` lets the driver deallocate instead.
    Task<Status> write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap);
    /// Advisory: the range's content is no longer needed. Unaligned edges are ignored.
    Task<Status> discard(uint64_t offset, uint64_t bytes);
    /// Makes every completed write durable.
    Task<Status> flush();
    /// What this layer says about [offset, offset+bytes); bytes is clamped to size().
    Task<Result<BlockStatus>> block_status(uint64_t offset, uint64_t bytes);
    /// Changes the size.
    Task<Status> truncate(uint64_t new_size);
    /// Flushes and releases the driver's state. Called once, before the last reference goes.
    Task<Status> close();

    /// A driver above signalled a step (see IoEvent). Filters record it; others ignore it.
    virtual void on_event(IoEvent /*event*/) {}

    /// Makes the node writable (a backing layer that a commit will write into) or read-only
    /// (a layer frozen under a new snapshot), in place. Read-only flushes first. The caller
    /// refreshes permissions afterwards (in a transaction). Default: not supported.
    virtual Task<Status> set_writable(bool writable);

    /// Called on a format node that is about to start writing in place (a backing layer a
    /// commit writes into, the layer a revert makes active), before its claim. Storage whose
    /// cluster-wide write lock was not wanted at open (an RBD image opened as a lower layer)
    /// wants it from now on: claim_pending() turns true, so the claim that follows takes the
    /// lock instead of writing where another host may write. Default: forwards to the storage
    /// child.
    virtual void expect_writes();

    /// Whether the storage under this node must be claimed before anything writes it: a
    /// store whose cluster-wide write lock is taken on the first write (an RBD image that
    /// other hosts may serve too) rather than at open. Format and filter nodes answer for
    /// their storage (the file or filtered child); default: theirs, else no.
    [[nodiscard]] virtual bool claim_pending() const;
    /// Makes this host the storage's only writer (takes the cluster-wide lock). True if the
    /// lock was newly taken: another host may have written the storage since this node read
    /// it, so a format node rereads what it caches. EROFS naming the holder if another host
    /// writes it. Caller: the holder of a drained section over this node (nothing in flight),
    /// the node writable. Default: forwards to the storage child, else false.
    virtual Task<Result<bool>> claim_writes();
    /// Gives back a claim that claim_writes() newly took, if nothing has been written under it
    /// since: the storage's cluster-wide lock is free for other hosts again and claim_pending()
    /// turns true. For a command refused after it claimed (a refused command leaves the lock
    /// with whoever had it). A claim something was written under is kept. Caller: the holder of
    /// a drained section over this node. Default: forwards to the storage child, else nothing.
    virtual Task<Status> release_claim();

    /// The backing file name this layer's image records ("" for none). Formats without such a
    /// field (caps().backing_name false) always answer "".
    [[nodiscard]] virtual std::string backing_file_name() const { return {}; }
    /// The backing format the image records, if it records one.
    [[nodiscard]] virtual std::optional<std::string> backing_format() const { return std::nullopt; }
    /// Rewrites the recorded backing name and format (a chain edit after commit or stream),
    /// through the driver because only it knows where the field lives and how to make the
    /// change durable. Only for caps().backing_name; otherwise EINVAL, a caller's mistake.
    virtual Task<Status> set_backing_name(std::string name, std::optional<std::string> format);

    /// Why this node refuses every write until it is reopened (its storage failed a flush,
    /// so what it holds is no longer known to be on disk), or "". Default: "".
    [[nodiscard]] virtual std::string refusing_writes() const { return {}; }
    /// refusing_writes() of this node or of any node of its layer below it (its storage, a
    /// filter's child; not its backing layers): the first reason found, or "".
    [[nodiscard]] std::string layer_refusing_writes() const;

    /// Adds driver-specific fields (format, cluster size, flags) to an info object.
    virtual void describe(JsonWriter* out) const;
    /// Bytes this layer has allocated in its storage (for info and capacity checks).
    virtual Task<Result<uint64_t>> allocated_bytes();
    /// Every byte at or past this offset reads as zeros because no write was ever issued there
    /// (in flight, failed part way or done), so a format driver need not write zeros into
    /// fresh space past it. size() is no such bound: it counts completed writes only.
    /// Default: nothing is known.
    [[nodiscard]] virtual uint64_t zeros_from() const { return UINT64_MAX; }

    // ChildOwner
    [[nodiscard]] std::string owner_name() const override { return name_; }
    Node* as_node() override { return this; }

    /// Permissions this node needs on `child`, given what its own parents need of it. Called
    /// during permission refresh, top-down.
    virtual void child_perm(const Child& child, Perms node_perm, Perms node_shared, Perms* perm,
                            Perms* shared) const;
    /// Refuses a permission set the node cannot grant (a read-only file asked for write).
    virtual Status check_perm(Perms perm, Perms shared) const;
    /// Applies a permission set that passed check_perm (image locks follow this).
    virtual void set_perm(Perms perm, Perms shared);

  protected:
    // ---- Driver entry points ----
    // Called by the generic layer only, with this node's in-flight count raised, never while
    // the node is drained except by the holder of the drain. Callers guarantee:
    //  * offset and byte counts are multiples of limits().request_alignment;
    //  * do_read/do_write: bytes <= limits().max_transfer, buffer aligned to
    //    limits().memory_alignment, range within size() (do_write may extend a resizable node);
    //  * overlapping writes are serialised if limits().serialise_writes.
    virtual Task<Status> do_read(uint64_t offset, MutBuf buf) = 0;
    virtual Task<Status> do_write(uint64_t offset, ConstBuf buf) = 0;
    /// Only if caps().write_zeroes. Range within size() unless caps().resize; offset and
    /// bytes are multiples of limits().zero_alignment as well.
    virtual Task<Status> do_write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap);
    /// Only if caps().discard. Range within size().
    virtual Task<Status> do_discard(uint64_t offset, uint64_t bytes);
    /// Write back this node's own caches and make them durable in its children.
    virtual Task<Status> do_flush() = 0;
    /// Only if caps().block_status. offset < size(), bytes clamped to size(); any alignment.
    virtual Task<Result<BlockStatus>> do_block_status(uint64_t offset, uint64_t bytes);
    /// Only if caps().resize.
    virtual Task<Status> do_truncate(uint64_t new_size);
    /// Default: do_flush().
    virtual Task<Status> do_close();

    /// Zeros written as buffers, in chunks. kGeneric goes through write() (alignment, tracking);
    /// kDriver calls do_write directly, for a driver inside its own do_write_zeroes or other
    /// entry point, whose range already meets the request alignment and is held.
    enum class ZeroPath { kGeneric, kDriver };
    Task<Status> write_zero_buffers(uint64_t offset, uint64_t bytes, ZeroPath path);

    NodeEnv env_;
    uint64_t size_ = 0;
    Limits limits_;
    Capabilities caps_;
    bool read_only_ = false;

  private:
    friend class Transaction;
    friend class Child;
    friend class Graph;

    void on_drained_begin() override;
    void on_drained_end() override;
    // Generic-layer helpers (node_io.cc).
    bool needs_tracking() const;
    Task<Status> read_chunks(uint64_t offset, MutBuf buf);
    Task<Status> write_chunks(uint64_t offset, ConstBuf buf);
    Task<Status> write_padded(uint64_t offset, ConstBuf buf, const RangeLock::Request* req);
    Task<Status> read_block_or_zero(uint64_t block, MutBuf dst);
    Task<Status> zeroes_in_place(uint64_t offset, uint64_t bytes, bool may_unmap);

    std::string name_;
    std::vector<Child*> parents_;
    Perms cumulative_perm_ = 0;
    Perms cumulative_shared_ = perm::kAll;
    bool closed_ = false;
    RangeLock tracked_;
};

/// An edge: `owner` uses `node` in `role`. Owned by the owner; holds a reference to the node.
/// I/O on an edge checks (in debug builds) that the edge holds the permission it exercises.
class Child {
  public:
    Child(ChildOwner* owner, std::shared_ptr<Node> node, ChildRole role, std::string name);
    Child(const Child&) = delete;
    Child& operator=(const Child&) = delete;
    ~Child();

    [[nodiscard]] ChildOwner* owner() const { return owner_; }
    [[nodiscard]] Node* node() const { return node_.get(); }
    [[nodiscard]] const std::shared_ptr<Node>& node_ref() const { return node_; }
    [[nodiscard]] ChildRole role() const { return role_; }
    [[nodiscard]] const std::string& name() const { return name_; }
    [[nodiscard]] Perms perm() const { return perm_; }
    /// What this edge lets others do: its computed set plus what a job explicitly allowed.
    [[nodiscard]] Perms shared() const { return shared_ | extra_shared_; }
    [[nodiscard]] bool user_edge() const { return role_ == ChildRole::kUser; }

    Task<Status> read(uint64_t offset, MutBuf buf) { return node_->read(offset, buf); }
    Task<Status> write(uint64_t offset, ConstBuf buf) {
        assert_may_write();
        return node_->write(offset, buf);
    }
    Task<Status> write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap) {
        assert_may_write();
        return node_->write_zeroes(offset, bytes, may_unmap);
    }
    Task<Status> discard(uint64_t offset, uint64_t bytes) {
        assert_may_write();
        return node_->discard(offset, bytes);
    }
    Task<Status> flush() { return node_->flush(); }
    void event(IoEvent e) { node_->on_event(e); }
    Task<Result<BlockStatus>> block_status(uint64_t offset, uint64_t bytes) {
        return node_->block_status(offset, bytes);
    }
    Task<Status> truncate(uint64_t new_size) { return node_->truncate(new_size); }

  private:
    friend class Transaction;
    friend class Graph;
    void assert_may_write() const;
    void link();
    void unlink();

    ChildOwner* owner_;
    std::shared_ptr<Node> node_;
    ChildRole role_;
    std::string name_;
    bool linked_ = false;
    // Effective permissions (set by the last successful refresh) and the pending values a
    // refresh computes before it knows whether the whole graph is consistent.
    Perms perm_ = 0;
    Perms shared_ = perm::kAll;
    Perms extra_shared_ = 0;
    Perms pending_perm_ = 0;
    Perms pending_shared_ = perm::kAll;
    // For user edges the owner states its permissions; node edges are computed.
    Perms user_perm_ = 0;
    Perms user_shared_ = perm::kAll;
};

}  // namespace imgfs
