#include "core/backend.h"

#include <ctime>

#include "core/drain.h"
#include "core/transaction.h"

namespace imgfs {

Child* BlockBackend::attach(Transaction* tx, std::shared_ptr<Node> node, Perms perm, Perms shared) {
    return tx->attach(this, std::move(node), ChildRole::kUser, "root", perm, shared);
}

bool BlockBackend::writable() const {
    return root() != nullptr && (root()->perm() & perm::kWrite) != 0;
}

void BlockBackend::fence(std::string reason) {
    fence_reason_ = reason.empty() ? std::string("failed") : std::move(reason);
}

Task<Status> BlockBackend::enter() {
    if (quiesced()) {
        co_await wait_unquiesced();
    }
    // Checked after the wait: the drained section may have removed or fenced the image.
    if (fenced()) {
        co_return make_error(EIO, "{} is failed: {}", name_, fence_reason_);
    }
    if (root() == nullptr) {
        co_return make_error(ENODEV, "{} has no image attached", name_);
    }
    co_return Status{};
}

Status BlockBackend::note(const char* op, Status st) {
    if (st) {
        return st;
    }
    const int64_t now = static_cast<int64_t>(std::time(nullptr));
    if (!io_failure_.ongoing(now)) {
        io_failure_.since_unix_s = now;
    }
    io_failure_.errnum = st.error().errnum;
    io_failure_.op = op;
    io_failure_.message = st.error().message();
    io_failure_.last_unix_s = now;
    ++io_failure_.failed;
    return st;
}

Status BlockBackend::check_writable() const {
    if (!writable()) {
        return make_error(EROFS, "{} is read-only", name_);
    }
    return {};
}

Task<Status> BlockBackend::enter_for_write(const char* op) {
    // Each pass claims at most once; a claim stays taken, so only a graph change that puts
    // another unclaimed top in place (a revert) makes a second pass claim again.
    for (int claims = 0;; ++claims) {
        if (claims == 4) {
            co_return note(op, make_error(EIO,
                                          "{}: the chain's top kept changing before it "
                                          "could be claimed for writing",
                                          name_));
        }
        CO_TRY(co_await enter());
        CO_TRY(check_writable());
        if (!claim_pending()) {
            // Nothing suspends between here and the caller's InFlightGuard, so a drain that
            // starts later waits for this request.
            co_return Status{};
        }
        // The claim suspends (it takes a cluster lock) while the request is not yet in
        // flight, so a job's drain may begin and end meanwhile, or be under way when it
        // returns: enter again rather than write into a drained section.
        CO_TRY(co_await claim_writes(op));
    }
}

Task<Result<bool>> BlockBackend::claim_writes(std::string op, bool for_request) {
    if (!claim_pending()) {
        co_return false;
    }
    auto serialised = co_await claim_mutex_.lock();
    CO_TRY(co_await enter());
    if (!claim_pending()) {
        co_return false;
    }
    std::shared_ptr<Node> top = root()->node_ref();
    std::vector<std::shared_ptr<Node>> drained_nodes;  // (g++ 12: no braced list in a co_await)
    drained_nodes.push_back(top);
    DrainGuard drained = co_await drain(std::move(drained_nodes));
    Result<bool> claimed = co_await top->claim_writes();
    if (!claimed) {
        if (!for_request) {
            co_return std::move(claimed).error();
        }
        Status failed = note(op.c_str(), claimed.error());
        co_return std::move(failed).error();
    }
    co_return *claimed;
}

Task<Status> BlockBackend::release_claim() {
    auto serialised = co_await claim_mutex_.lock();
    if (root() == nullptr) {
        co_return Status{};
    }
    std::shared_ptr<Node> top = root()->node_ref();
    std::vector<std::shared_ptr<Node>> drained_nodes;  // (g++ 12: no braced list in a co_await)
    drained_nodes.push_back(top);
    DrainGuard drained = co_await drain(std::move(drained_nodes));
    co_return co_await top->release_claim();
}

Task<Status> BlockBackend::read(uint64_t offset, MutBuf buf) {
    CO_TRY(co_await enter());
    InFlightGuard guard(this);
    co_return note("read", co_await root()->read(offset, buf));
}

Task<Status> BlockBackend::read_ahead(uint64_t offset, MutBuf buf) {
    CO_TRY(co_await enter());
    InFlightGuard guard(this);
    co_return co_await root()->read(offset, buf);
}

// Callers keep a write within size(), but they read the size before the request waited out a
// drained section, and a graph change in it (a revert to a smaller layer) may have shrunk the
// disk. A format node that can grow would take a write past its end, acknowledge it, and never
// show it: refused instead, as any write past the end of the disk is.
Status BlockBackend::refuse_past_end(uint64_t offset, uint64_t bytes, const char* op) {
    const uint64_t size_now = size();
    if (offset > size_now || bytes > size_now - offset) {
        return make_error(ENOSPC,
                          "{}: {} of {} bytes at {} is past the end of the disk ({} bytes since "
                          "a graph change)",
                          name_, op, bytes, offset, size_now);
    }
    return {};
}

Task<Status> BlockBackend::write(uint64_t offset, ConstBuf buf) {
    CO_TRY(co_await enter_for_write("write"));
    CO_TRY(refuse_past_end(offset, buf.size(), "write"));
    InFlightGuard guard(this);
    ContentChange change(this);
    co_return note("write", co_await root()->write(offset, buf));
}

Task<Status> BlockBackend::write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap) {
    CO_TRY(co_await enter_for_write("write-zeroes"));
    CO_TRY(refuse_past_end(offset, bytes, "write-zeroes"));
    InFlightGuard guard(this);
    ContentChange change(this);
    co_return note("write-zeroes", co_await root()->write_zeroes(offset, bytes, may_unmap));
}

Task<Status> BlockBackend::discard(uint64_t offset, uint64_t bytes) {
    CO_TRY(co_await enter_for_write("discard"));
    InFlightGuard guard(this);
    ContentChange change(this);
    co_return note("discard", co_await root()->discard(offset, bytes));
}

Task<Status> BlockBackend::flush() {
    CO_TRY(co_await enter());
    InFlightGuard guard(this);
    co_return note("flush", co_await root()->flush());
}

Task<Status> BlockBackend::truncate(uint64_t new_size) {
    // Checked before the claim too, which takes a cluster lock: a refused resize must not.
    CO_TRY(co_await enter());
    if ((root()->perm() & perm::kResize) == 0) {
        co_return make_error(EPERM, "{} may not change its size", name_);
    }
    CO_TRY(co_await enter_for_write("truncate"));
    if ((root()->perm() & perm::kResize) == 0) {
        co_return make_error(EPERM, "{} may not change its size", name_);
    }
    InFlightGuard guard(this);
    ContentChange change(this);
    co_return note("truncate", co_await root()->truncate(new_size));
}

Task<Result<ChainStatus>> BlockBackend::block_status_above(uint64_t offset, uint64_t bytes) {
    CO_TRY(co_await enter());
    InFlightGuard guard(this);
    // A job's filter has no backing edge of its own: the chain starts at what it filters.
    Node* top = root_node();
    while (top->backing() == nullptr) {
        Child* filtered = top->child(ChildRole::kFiltered);
        if (filtered == nullptr) {
            break;
        }
        top = filtered->node();
    }
    co_return co_await imgfs::block_status_above(top, offset, bytes);
}

}  // namespace imgfs
