#include "jobs/mirror_filter.h"

#include "core/drain.h"
#include "core/event_loop.h"
#include "core/transaction.h"

namespace imgfs {

std::shared_ptr<MirrorFilter> MirrorFilter::create(NodeEnv env, std::string name, Transaction* tx,
                                                   std::shared_ptr<Node> top) {
    auto f = std::make_shared<MirrorFilter>(env, std::move(name));
    f->size_ = top->size();
    f->limits_ = top->limits();
    f->caps_ = top->caps();
    // The size stays put while a job runs: resize requests reach do_truncate, which refuses
    // them with EBUSY (a conflicting job), instead of the generic "cannot resize" ENOTSUP.
    f->caps_.resize = true;
    f->caps_.backing_name = false;  // a filter records no backing file name of its own
    tx->attach(f.get(), std::move(top), ChildRole::kFiltered, "filtered");
    return f;
}

MirrorFilter::MirrorFilter(NodeEnv env, std::string name)
    : Node(env, std::move(name)), tracker_(env.loop), unmirrored_done_(env.loop) {}

void MirrorFilter::child_perm(const Child& /*child*/, Perms node_perm, Perms node_shared,
                              Perms* perm, Perms* shared) const {
    *perm = node_perm;
    // The job writes the top layer itself (stream) without changing what it shows.
    *shared = node_shared | perm::kWriteUnchanged;
}

Task<Status> MirrorFilter::do_read(uint64_t offset, MutBuf buf) {
    co_return co_await top()->read(offset, buf);
}

// A write's mode is the one it began in: it decides both whether the write excludes
// overlapping ones and whether it is mirrored, so a switch to sync mode cannot make a write
// that overlapped another without excluding it write the target out of order.
MirrorFilter::Mode MirrorFilter::begin_write() {
    const Mode mode = mode_;
    if (mode != Mode::kSync) {
        ++unmirrored_in_flight_;
    }
    return mode;
}

void MirrorFilter::end_write(Mode mode) {
    if (mode != Mode::kSync && --unmirrored_in_flight_ == 0) {
        unmirrored_done_.notify_all();
    }
}

Task<void> MirrorFilter::wait_unmirrored_writes() {
    while (unmirrored_in_flight_ > 0) {
        co_await unmirrored_done_.wait();
    }
}

void MirrorFilter::after_write(Mode mode, const Status& st, uint64_t offset, uint64_t bytes,
                               const Status& mirrored) {
    if (dirty_ == nullptr) {
        return;
    }
    // A failed write may have reached the top in part (one of its clusters, before the next
    // one's allocation failed), so the target must get whatever the top shows there now.
    if (!st || mode != Mode::kSync || !mirrored) {
        dirty_->set(offset, bytes);
    }
    if (st && mode == Mode::kSync && !mirrored) {
        ++mirror_failures_;
    }
}

Task<Status> MirrorFilter::do_write(uint64_t offset, ConstBuf buf) {
    const Mode mode = begin_write();
    // In sync mode overlapping writes exclude each other: each reaches the target in the
    // order it reached the top. Non-overlapping ones still run side by side.
    RangeLock::Request req(&tracker_, offset, buf.size(), mode == Mode::kSync);
    co_await tracker_.acquire(&req);
    Status st = co_await top()->write(offset, buf);
    Status mirrored;
    if (st && mode == Mode::kSync && target_ != nullptr) {
        mirrored = co_await target_->write(offset, buf);
    }
    after_write(mode, st, offset, buf.size(), mirrored);
    end_write(mode);
    co_return st;
}

Task<Status> MirrorFilter::do_write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap) {
    const Mode mode = begin_write();
    RangeLock::Request req(&tracker_, offset, bytes, mode == Mode::kSync);
    co_await tracker_.acquire(&req);
    Status st = co_await top()->write_zeroes(offset, bytes, may_unmap);
    Status mirrored;
    if (st && mode == Mode::kSync && target_ != nullptr) {
        mirrored = co_await target_->write_zeroes(offset, bytes, false);
    }
    after_write(mode, st, offset, bytes, mirrored);
    end_write(mode);
    co_return st;
}

Task<Status> MirrorFilter::do_discard(uint64_t offset, uint64_t bytes) {
    const Mode mode = begin_write();
    RangeLock::Request req(&tracker_, offset, bytes, mode == Mode::kSync);
    co_await tracker_.acquire(&req);
    Status st = co_await top()->discard(offset, bytes);
    // Whatever the top shows there now (discarded or not) must reach the target: copied, not
    // mirrored, since a discard's content is not known.
    if (dirty_ != nullptr) {
        dirty_->set(offset, bytes);
    }
    end_write(mode);
    co_return st;
}

Task<Status> MirrorFilter::do_flush() {
    co_return co_await top()->flush();
}

Task<Result<BlockStatus>> MirrorFilter::do_block_status(uint64_t offset, uint64_t bytes) {
    co_return co_await top()->block_status(offset, bytes);
}

Task<Status> MirrorFilter::do_truncate(uint64_t /*new_size*/) {
    co_return make_error(
        EBUSY, "{}: the size cannot change while a job runs; grow the disk after it ends", name());
}

Task<Status> MirrorFilter::do_close() {
    co_return Status{};
}

Task<Status> remove_mirror_filter(Graph* graph, std::shared_ptr<MirrorFilter> filter,
                                  std::shared_ptr<Node> top, Child* job_edge) {
    std::vector<std::shared_ptr<Node>> nodes{filter};
    DrainGuard drained = co_await drain(nodes);
    Transaction tx(graph);
    tx.replace_node(filter.get(), std::move(top));
    tx.detach(filter->top());
    tx.detach(job_edge);
    Status st = tx.commit();
    if (!st) {
        co_return make_error(st.error().errnum, "the {} filter could not be taken out again: {}",
                             filter->name(), st.error().message());
    }
    co_return Status{};
}

}  // namespace imgfs
