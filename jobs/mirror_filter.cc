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
    : Node(env, std::move(name)), tracker_(env.loop) {}

void MirrorFilter::child_perm(const Child& /*child*/, Perms node_perm, Perms node_shared,
                              Perms* perm, Perms* shared) const {
    *perm = node_perm;
    // The job writes the top layer itself (stream) without changing what it shows.
    *shared = node_shared | perm::kWriteUnchanged;
}

Task<Status> MirrorFilter::do_read(uint64_t offset, MutBuf buf) {
    co_return co_await top()->read(offset, buf);
}

void MirrorFilter::after_write(Status* st, uint64_t offset, uint64_t bytes, Status mirrored) {
    if (!*st || dirty_ == nullptr) {
        return;
    }
    if (mode_ == Mode::kAsync || !mirrored) {
        // The target does not have these bytes yet: the job copies them (again).
        dirty_->set(offset, bytes);
    }
}

Task<Status> MirrorFilter::do_write(uint64_t offset, ConstBuf buf) {
    RangeLock::Request req(&tracker_, offset, buf.size(), false);
    co_await tracker_.acquire(&req);
    Status st = co_await top()->write(offset, buf);
    Status mirrored;
    if (st && mode_ == Mode::kSync && target_ != nullptr) {
        mirrored = co_await target_->write(offset, buf);
    }
    after_write(&st, offset, buf.size(), std::move(mirrored));
    co_return st;
}

Task<Status> MirrorFilter::do_write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap) {
    RangeLock::Request req(&tracker_, offset, bytes, false);
    co_await tracker_.acquire(&req);
    Status st = co_await top()->write_zeroes(offset, bytes, may_unmap);
    Status mirrored;
    if (st && mode_ == Mode::kSync && target_ != nullptr) {
        mirrored = co_await target_->write_zeroes(offset, bytes, false);
    }
    after_write(&st, offset, bytes, std::move(mirrored));
    co_return st;
}

Task<Status> MirrorFilter::do_discard(uint64_t offset, uint64_t bytes) {
    RangeLock::Request req(&tracker_, offset, bytes, false);
    co_await tracker_.acquire(&req);
    Status st = co_await top()->discard(offset, bytes);
    // Whatever the top shows there now must reach the target: copy it.
    after_write(&st, offset, bytes, make_error(EAGAIN, "discarded"));
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
