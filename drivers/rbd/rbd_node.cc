#include "drivers/rbd/rbd_node.h"

#include <algorithm>
#include <cassert>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

#include <sys/eventfd.h>

#include "core/event_loop.h"
#include "core/json.h"
#include "core/log.h"

namespace imgfs {

Result<std::shared_ptr<RbdNode>> RbdNode::open(NodeEnv env, std::string name, RbdImage image,
                                               RbdLock lock, uint64_t size_bytes) {
    // Blocking on purpose: librbd only writes to it, and a read on the ring waits for it.
    int efd = eventfd(0, EFD_CLOEXEC);
    if (efd < 0) {
        return make_error(errno, "{}: eventfd", name);
    }
    auto event_fd = std::make_shared<UniqueFd>(efd);
    if (int r = ceph().rbd_set_image_notification(image.handle(), efd, EVENT_TYPE_EVENTFD); r < 0) {
        image.close_off_loop(event_fd);
        return rbd_error(r, image.pool()->cluster(),
                         fmt::format("{}: cannot register for completions", name));
    }
    auto node = std::make_shared<RbdNode>(env, std::move(name), std::move(image),
                                          std::move(*event_fd), lock);
    node->size_ = size_bytes;
    node->zeros_from_ = lock == RbdLock::kPending ? UINT64_MAX : size_bytes;
    node->image_size_ = size_bytes;
    return node;
}

RbdNode::RbdNode(NodeEnv env, std::string name, RbdImage image, UniqueFd event_fd, RbdLock lock)
    : Node(env, std::move(name)),
      image_(std::move(image)),
      lock_(lock),
      event_fd_(std::move(event_fd)),
      resize_mutex_(env.loop) {
    read_only_ = image_.read_only();
    // librbd takes any byte range and any buffer; requests beyond this are split above.
    limits_.max_transfer = 32ULL << 20;
    caps_.write_zeroes = true;
    caps_.discard = true;
    caps_.resize = true;
    caps_.block_status = true;
}

RbdNode::~RbdNode() {
    assert(in_flight_ == 0 && "RBD node destroyed with requests in flight");
    // Not closed (a chain whose open failed further up drops its nodes): the close goes to
    // the offload thread, with the eventfd librbd signals, which stays open until then.
    image_.close_off_loop(std::make_shared<UniqueFd>(std::move(event_fd_)));
    image_.reset();
}

void RbdNode::describe(JsonWriter* out) const {
    out->field("pool", image_.pool()->display_name());
    out->field("image", image_.name());
    const char* lock = "none";
    if (lock_ == RbdLock::kPending) {
        lock = "taken on the first write";
    } else if (lock_ == RbdLock::kHeld) {
        lock = "held";
    }
    out->field("exclusive_lock", lock);
}

void RbdNode::expect_writes() {
    // Written without the lock, the image would rely on librbd's own lock, which passes to any
    // client that asks for it: a second host's scan would take it and serve the image too.
    if (lock_ == RbdLock::kNone && !read_only_) {
        lock_ = RbdLock::kPending;
        zeros_from_ = UINT64_MAX;  // as at an open with the lock pending: known once claimed
    }
}

Task<Result<bool>> RbdNode::claim_writes() {
    claimed_ = true;  // every write comes through here first: a flush has work from now on
    if (lock_ != RbdLock::kPending) {
        co_return false;
    }
    auto guard = co_await resize_mutex_.lock();
    if (lock_ != RbdLock::kPending) {
        co_return false;  // a concurrent write took it
    }
    const RbdImage* image = &image_;
    std::function<Result<uint64_t>()> take = [image]() -> Result<uint64_t> {
        TRY(image->lock_exclusive());
        return image->size();
    };
    CO_TRY_ASSIGN(uint64_t size,
                  co_await image_.pool()->offloader()->run<Result<uint64_t>>(std::move(take)));
    // Nothing is written while the lock is pending, so nothing is in flight past these.
    size_ = size;
    image_size_ = size;
    zeros_from_ = size;
    lock_ = RbdLock::kHeld;
    writes_at_claim_ = writes_issued_;
    if (env_.log != nullptr) {
        env_.log->info("{}: took the RBD exclusive lock", name());
    }
    co_return true;
}

Task<Status> RbdNode::release_claim() {
    auto guard = co_await resize_mutex_.lock();
    if (lock_ != RbdLock::kHeld || writes_issued_ != writes_at_claim_) {
        co_return Status{};  // not taken by a claim, or written under: kept
    }
    const RbdImage* image = &image_;
    std::function<Result<bool>()> give = [image]() -> Result<bool> {
        TRY(image->unlock_exclusive());
        return true;
    };
    CO_TRY(co_await image_.pool()->offloader()->run<Result<bool>>(std::move(give)));
    lock_ = RbdLock::kPending;
    zeros_from_ = UINT64_MAX;  // another host may write it from now on
    if (env_.log != nullptr) {
        env_.log->info("{}: gave the RBD exclusive lock back", name());
    }
    co_return Status{};
}

Result<rbd_completion_t> RbdNode::completion(Op* op, const char* what) const {
    rbd_completion_t c = nullptr;
    if (int r = ceph().rbd_aio_create_completion(op, nullptr, &c); r < 0) {
        return make_error(-r, "{}: cannot start {}", name(), what);
    }
    return c;
}

// Parks the waiting coroutine until unpark(): its request finished, or the eventfd reader left.
struct RbdNode::Park {
    RbdNode* self;
    Op* op;
    bool await_ready() noexcept { return false; }
    void await_suspend(std::coroutine_handle<> h) noexcept {
        op->parked = h;
        op->next_parked = self->parked_head_;
        self->parked_head_ = op;
    }
    void await_resume() noexcept {}
};

void RbdNode::unpark(Op* op) {
    for (Op** p = &parked_head_; *p != nullptr; p = &(*p)->next_parked) {
        if (*p == op) {
            *p = op->next_parked;
            op->next_parked = nullptr;
            env_.loop->schedule(std::exchange(op->parked, nullptr));
            return;
        }
    }
}

Task<void> RbdNode::wait(Op* op) {
    ++in_flight_;
    while (!op->done) {
        if (polling_) {
            co_await Park{this, op};
        } else {
            co_await poll_events();
        }
    }
    --in_flight_;
    // Whoever is still waiting needs a reader of the eventfd.
    if (in_flight_ > 0 && !polling_ && parked_head_ != nullptr) {
        unpark(parked_head_);
    }
}

// Reads the eventfd once (librbd signals it after queueing completions), then completes what
// finished. Only one coroutine does this at a time (polling_).
Task<void> RbdNode::poll_events() {
    polling_ = true;
    uint64_t signalled = 0;
    for (;;) {
        int32_t r = co_await env_.loop->read_some(
            event_fd_.get(), MutBuf(reinterpret_cast<uint8_t*>(&signalled), sizeof signalled), 0);
        if (r == sizeof signalled) {
            break;
        }
        if (r == -EINTR || r == -EAGAIN) {
            continue;
        }
        // Not expected of an eventfd. The completions are queued in librbd whatever the
        // eventfd does, so poll for them every millisecond instead of spinning on the error
        // (the waiters keep their buffers until their requests are done either way).
        if (!eventfd_failed_ && env_.log != nullptr) {
            env_.log->warn("{}: reading the completion eventfd: {}; polling for completions",
                           name(), strerror(-r));
        }
        eventfd_failed_ = true;
        co_await env_.loop->sleep(std::chrono::milliseconds(1));
        break;
    }
    polling_ = false;
    complete_finished();
}

void RbdNode::complete_finished() {
    constexpr int kBatch = 32;
    rbd_completion_t finished[kBatch];
    for (;;) {
        int n = ceph().rbd_poll_io_events(image_.handle(), finished, kBatch);
        for (int i = 0; i < n; ++i) {
            auto* op = static_cast<Op*>(ceph().rbd_aio_get_arg(finished[i]));
            op->result = ceph().rbd_aio_get_return_value(finished[i]);
            ceph().rbd_aio_release(finished[i]);
            op->done = true;
            if (op->parked) {
                unpark(op);
            }
        }
        if (n < kBatch) {
            return;
        }
    }
}

namespace {
// "write of 4096 bytes at 8192"; a flush has no range.
std::string request_text(const char* what, uint64_t offset, uint64_t bytes) {
    if (bytes == 0) {
        return what;
    }
    return fmt::format("{} of {} bytes at {}", what, bytes, offset);
}
}  // namespace

Error RbdNode::op_error(ssize_t result, const char* what, uint64_t offset, uint64_t bytes) const {
    return rbd_error(static_cast<int>(result), image_.pool()->cluster(),
                     fmt::format("{}: {}", name(), request_text(what, offset, bytes)));
}

Error RbdNode::skipped_error(const std::string& what) const {
    return make_error(EIO,
                      "{}: {} skipped: the Ceph cluster did not answer within {} s, and imgfs is "
                      "closing its images",
                      name(), what, image_.pool()->timeout_s());
}

template <typename Issue>
Task<Result<ssize_t>> RbdNode::run(const char* what, uint64_t offset, uint64_t bytes, Issue issue) {
    if (image_.pool()->cluster().skip_round_trips()) {
        co_return skipped_error(request_text(what, offset, bytes));
    }
    Op op;
    CO_TRY_ASSIGN(rbd_completion_t c, completion(&op, what));
    if (int r = issue(c); r < 0) {
        ceph().rbd_aio_release(c);
        co_return op_error(r, what, offset, bytes);
    }
    co_await wait(&op);
    if (op.result < 0) {
        co_return op_error(op.result, what, offset, bytes);
    }
    image_.pool()->cluster().note_answered();
    co_return op.result;
}

Task<Status> RbdNode::do_read(uint64_t offset, MutBuf buf) {
    rbd_image_t image = image_.handle();
    CO_TRY_ASSIGN(ssize_t got, co_await run("read", offset, buf.size(), [&](rbd_completion_t c) {
                      return ceph().rbd_aio_read(image, offset, buf.size(),
                                                 reinterpret_cast<char*>(buf.data()), c);
                  }));
    // Within the size librbd returns every byte; a shorter read means a concurrent shrink.
    if (static_cast<uint64_t>(got) < buf.size()) {
        std::memset(buf.data() + got, 0, buf.size() - static_cast<uint64_t>(got));
    }
    co_return Status{};
}

Task<Status> RbdNode::do_write(uint64_t offset, ConstBuf buf) {
    CO_TRY(co_await claim_writes());
    ++writes_issued_;
    CO_TRY(co_await grow_to(offset + buf.size()));
    zeros_from_ = std::max(zeros_from_, offset + buf.size());
    rbd_image_t image = image_.handle();
    CO_TRY(co_await run("write", offset, buf.size(), [&](rbd_completion_t c) {
        return ceph().rbd_aio_write(image, offset, buf.size(),
                                    reinterpret_cast<const char*>(buf.data()), c);
    }));
    co_return Status{};
}

Task<Status> RbdNode::do_write_zeroes(uint64_t offset, uint64_t bytes, bool /*may_unmap*/) {
    CO_TRY(co_await claim_writes());
    ++writes_issued_;
    // Past the end, growing is enough: an image grows with zeros.
    if (offset >= zeros_from_) {
        co_return co_await grow_to(offset + bytes);
    }
    CO_TRY(co_await grow_to(offset + bytes));
    rbd_image_t image = image_.handle();
    CO_TRY(co_await run("write zeroes", offset, bytes, [&](rbd_completion_t c) {
        return ceph().rbd_aio_write_zeroes(image, offset, bytes, c, 0, 0);
    }));
    co_return Status{};
}

Task<Status> RbdNode::do_discard(uint64_t offset, uint64_t bytes) {
    CO_TRY(co_await claim_writes());
    ++writes_issued_;
    rbd_image_t image = image_.handle();
    CO_TRY(co_await run("discard", offset, bytes, [&](rbd_completion_t c) {
        return ceph().rbd_aio_discard(image, offset, bytes, c);
    }));
    co_return Status{};
}

Task<Status> RbdNode::do_flush() {
    if (lock_ == RbdLock::kPending || !claimed_) {
        // Nothing was written here. librbd refuses even an empty flush without the lock once
        // the open probed it (EROFS), and this host may not take it just to flush; and an
        // unwritten base's flush would only wait on the cluster (at unmount, on a dead one,
        // for the whole deadline).
        co_return Status{};
    }
    rbd_image_t image = image_.handle();
    CO_TRY(co_await run("flush", 0, 0,
                        [&](rbd_completion_t c) { return ceph().rbd_aio_flush(image, c); }));
    co_return Status{};
}

namespace {

// The extents rbd_diff_iterate2 reports as existing (written, or in a parent image).
int collect_extent(uint64_t offset, size_t bytes, int exists, void* arg) {
    if (exists != 0) {
        static_cast<std::vector<std::pair<uint64_t, uint64_t>>*>(arg)->emplace_back(offset, bytes);
    }
    return 0;
}

// The run at `offset` within [offset, offset + bytes) given the existing extents.
BlockStatus run_at(std::vector<std::pair<uint64_t, uint64_t>> extents, uint64_t offset,
                   uint64_t bytes) {
    std::sort(extents.begin(), extents.end());
    const uint64_t end = offset + bytes;
    uint64_t data_end = offset;  // end of the data run starting at offset, if any
    for (const auto& [start, length] : extents) {
        if (start > data_end) {
            break;
        }
        data_end = std::max(data_end, start + length);
    }
    if (data_end > offset) {
        return BlockStatus{Alloc::kData, std::min(data_end, end) - offset};
    }
    uint64_t next = end;
    for (const auto& [start, length] : extents) {
        if (start + length > offset) {
            next = std::min(next, std::max(start, offset));
        }
    }
    return BlockStatus{Alloc::kZero, next - offset};
}

}  // namespace

Task<Result<BlockStatus>> RbdNode::do_block_status(uint64_t offset, uint64_t bytes) {
    if (offset >= zeros_from_) {
        co_return BlockStatus{Alloc::kZero, bytes};  // never written: no round trip
    }
    // A diff lists every object of its range: look a bounded way ahead.
    const uint64_t span = std::min<uint64_t>(bytes, 64ULL << 20);
    rbd_image_t image = image_.handle();
    using Extents = std::vector<std::pair<uint64_t, uint64_t>>;
    std::function<Result<Extents>()> list = [image, offset, span]() -> Result<Extents> {
        Extents extents;
        int r =
            ceph().rbd_diff_iterate2(image, nullptr, offset, span, 1, 0, collect_extent, &extents);
        if (r < 0) {
            return Error{-r, ""};
        }
        return extents;
    };
    Result<Extents> extents =
        co_await image_.pool()->offloader()->run<Result<Extents>>(std::move(list));
    if (!extents) {
        co_return rbd_error(-extents.error().errnum, image_.pool()->cluster(),
                            fmt::format("{}: cannot list the allocation at {}", name(), offset));
    }
    co_return run_at(std::move(*extents), offset, span);
}

Task<Status> RbdNode::do_truncate(uint64_t new_size) {
    CO_TRY(co_await claim_writes());
    ++writes_issued_;
    auto guard = co_await resize_mutex_.lock();
    CO_TRY(co_await resize_image(new_size, true));
    size_ = new_size;
    zeros_from_ = std::min(zeros_from_, new_size);
    co_return Status{};
}

Task<Status> RbdNode::do_close() {
    Status st = co_await do_flush();
    if (st && !read_only_ && image_size_ > size_) {
        auto guard = co_await resize_mutex_.lock();
        st = co_await resize_image(size_, true);
    }
    // rbd_close is a round trip (it releases the lock), up to the deadline on a dead cluster:
    // off the loop. Nothing uses the image after close(). On a cluster that stopped
    // answering while closing, the close runs aside, side by side with the other layers'
    // (see RadosCluster), and is not waited for: the pool waits for it when it goes.
    if (image_.pool()->cluster().skip_round_trips()) {
        image_.close_off_loop(std::make_shared<UniqueFd>(std::move(event_fd_)));
        co_return st;
    }
    RbdImage* image = &image_;
    std::function<int()> close = [image]() {
        image->close_image();
        return 0;
    };
    (void)co_await image_.pool()->offloader()->run<int>(std::move(close));
    co_return st;
}

namespace {
// How far the image grows ahead of a write past its end: an eighth of its size, in whole 4 MiB
// objects, between 4 MiB and 256 MiB. At most one resize per 64 appended 64 KiB clusters.
uint64_t grow_ahead_bytes(uint64_t image_size) {
    constexpr uint64_t kObject = 4ULL << 20;
    const uint64_t step = std::clamp<uint64_t>(image_size / 8, kObject, 64 * kObject);
    return step / kObject * kObject;
}
}  // namespace

Task<Status> RbdNode::grow_to(uint64_t end) {
    if (end <= size_) {
        co_return Status{};
    }
    if (end > image_size_) {
        const uint64_t failures_before = grow_failures_;
        auto guard = co_await resize_mutex_.lock();
        if (grow_failures_ != failures_before) {
            // The grow this write waited behind failed (on a dead cluster, at the deadline):
            // the same answer now, rather than one more deadline per waiting write.
            co_return last_grow_error_;
        }
        if (end > image_size_) {  // else a concurrent write grew it meanwhile
            Status grown = co_await resize_image(
                std::max(end, image_size_ + grow_ahead_bytes(image_size_)), false);
            if (!grown) {
                ++grow_failures_;
                last_grow_error_ = grown.error();
                co_return grown;
            }
        }
    }
    size_ = std::max(size_, end);
    co_return Status{};
}

namespace {
int no_progress(uint64_t /*done*/, uint64_t /*total*/, void* /*arg*/) {
    return 0;
}
}  // namespace

Task<Status> RbdNode::resize_image(uint64_t new_size, bool allow_shrink) {
    assert(resize_mutex_.locked());
    if (image_.pool()->cluster().skip_round_trips()) {
        co_return skipped_error(fmt::format("resizing to {} bytes", new_size));
    }
    rbd_image_t image = image_.handle();
    std::function<int()> call = [image, new_size, allow_shrink] {
        return ceph().rbd_resize2(image, new_size, allow_shrink, no_progress, nullptr);
    };
    int r = co_await image_.pool()->offloader()->run<int>(std::move(call));
    if (r < 0) {
        co_return rbd_error(r, image_.pool()->cluster(),
                            fmt::format("{}: cannot resize to {} bytes", name(), new_size));
    }
    image_.pool()->cluster().note_answered();
    image_size_ = new_size;
    co_return Status{};
}

}  // namespace imgfs
