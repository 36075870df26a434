#include "jobs/stream_job.h"

#include <algorithm>
#include <map>
#include <set>

#include "core/chain_status.h"
#include "core/drain.h"
#include "core/event_loop.h"
#include "core/log.h"
#include "core/transaction.h"
#include "jobs/chain_edit.h"

namespace imgfs {

namespace {

constexpr uint64_t kChunkBytes = 1 << 20;

}  // namespace

StreamJob::StreamJob(ImageSet* images, uint64_t id, std::shared_ptr<Export> e)
    : Job(images->env().loop, id, "stream", std::move(e)), images_(images) {}

StreamJob::~StreamJob() = default;

void StreamJob::release_nodes() {
    if (writer_ != nullptr) {
        // Left over only when the filter could not be taken out (the image is fenced).
        Transaction tx(images_->env().graph);
        tx.detach(writer_);
        if (Status st = tx.commit_removal(); !st) {
            images_->env().log->warn(
                "{}: permissions not refreshed after the stream job let go: {}", image_name(),
                st.error().message());
        }
        writer_ = nullptr;
    }
    filter_.reset();
    top_.reset();
}

Task<Status> StreamJob::attach() {
    TimedMutex::Guard locked = co_await image()->ops.lock();
    Export* e = image();
    top_ = e->chain.layers.front().node;
    std::vector<std::shared_ptr<Node>> nodes{top_};
    DrainGuard drained = co_await drain(nodes);
    Transaction tx(images_->env().graph);
    filter_ = MirrorFilter::create(images_->env(), e->name + " (stream)", &tx, top_);
    tx.replace_node(top_.get(), filter_);
    // Copying backing data up does not change what the top shows.
    writer_ = tx.attach(this, top_, ChildRole::kUser, "stream writer",
                        perm::kConsistentRead | perm::kWriteUnchanged, perm::kAll);
    Status st = tx.commit();
    if (!st) {
        filter_.reset();
        writer_ = nullptr;
    }
    co_return st;
}

// The caller holds the image's lock.
Task<void> StreamJob::detach() {
    if (!filter_) {
        co_return;
    }
    std::shared_ptr<MirrorFilter> filter = std::move(filter_);
    Status removed = co_await remove_mirror_filter(images_->env().graph, filter, top_, writer_);
    if (!removed) {
        images_->fence(image(), removed.error().message());
        co_return;
    }
    writer_ = nullptr;
}

Task<void> StreamJob::abandon() {
    TimedMutex::Guard locked = co_await image()->ops.lock();
    co_await detach();
}

Task<Result<uint64_t>> StreamJob::copy_chunk(uint64_t offset, uint64_t bytes) {
    // One of the filter's requests, as a commit's copy is (CommitJob::copy_range): a drained
    // section on the image waits for it and holds the next one back.
    co_await filter_->wait_unquiesced();
    InFlightGuard counted(filter_.get());
    RangeLock::Request req(filter_->tracker(), offset, bytes, true);
    co_await filter_->tracker()->acquire(&req);
    Node* top = top_.get();
    Node* below = top->backing()->node();
    uint64_t copied = 0;
    for (uint64_t pos = offset; pos < offset + bytes;) {
        // Checked under the request: what the top holds now (a guest write may have landed).
        CO_TRY_ASSIGN(BlockStatus own, co_await top->block_status(pos, offset + bytes - pos));
        if (own.alloc != Alloc::kUnallocated) {
            pos += own.bytes;
            continue;
        }
        uint64_t run_end = pos + own.bytes;
        while (pos < run_end) {
            // Zeros below (or past a shorter backing file) need no copy: without a backing file
            // unallocated reads as zeros too.
            ChainStatus st{false, run_end - pos, -1};
            if (pos < below->size()) {
                CO_TRY_ASSIGN(st, co_await block_status_above(below, pos, run_end - pos));
            }
            if (st.data) {
                AlignedBuffer buf(st.bytes);
                CO_TRY(co_await top->read(pos, buf.span()));
                if (!is_zero(buf.span())) {
                    CO_TRY(co_await writer_->write(pos, buf.span()));
                    copied += st.bytes;
                }
            }
            pos += st.bytes;
        }
    }
    co_return copied;
}

namespace {

// Marks layers as changing in `images` (ImageSet::mark_changing) for as long as it lives. The
// set outlives every job.
class ChangingMark {
  public:
    explicit ChangingMark(ImageSet* images) : images_(images) {}
    ChangingMark(const ChangingMark&) = delete;
    ChangingMark& operator=(const ChangingMark&) = delete;
    ~ChangingMark() {
        for (FileId id : ids_) {
            images_->unmark_changing(id);
        }
    }
    void mark(FileId id, std::string why) {
        if (id != FileId{}) {
            images_->mark_changing(id, std::move(why));
            ids_.push_back(id);
        }
    }

  private:
    ImageSet* images_;
    std::vector<FileId> ids_;
};

}  // namespace

// The caller holds the image's lock.
Task<Status> StreamJob::finish() {
    Export* e = image();
    std::vector<Layer>& layers = e->chain.layers;
    // A directory changed under the job stops it here, before anything on disk is touched.
    CO_TRY(co_await images_->verify_chain(image_ref()));
    // Before the drain: it may read every header of the store.
    CO_TRY_ASSIGN(const size_t own, co_await removable_own_layers());
    // From the check on, a rescan must not open a chain through a layer about to be deleted
    // (a clone made on it meanwhile): the deletion would pull it from under that export.
    ChangingMark deleting(images_);
    for (size_t i = 1; i <= own; ++i) {
        deleting.mark(layers[i].id, fmt::format("the stream of {} runs ({} is about to be deleted)",
                                                e->name, layers[i].file));
    }
    std::vector<std::shared_ptr<Node>> nodes{filter_};
    DrainGuard drained = co_await drain(nodes);
    CO_TRY(co_await writer_->flush());
    if (own > 0) {
        CO_TRY(co_await splice_out(images_, image_ref(), 1, own, true));
    } else {
        CO_TRY(co_await top_->set_backing_name("", std::nullopt));
    }
    Transaction tx(images_->env().graph);
    tx.replace_node(filter_.get(), top_);
    tx.detach(filter_->top());
    tx.detach(writer_);
    tx.detach(top_->backing());
    CO_TRY(tx.commit());
    writer_ = nullptr;
    filter_.reset();
    drained.end();
    // Every layer below leaves this chain: closed now unless another image still uses it.
    std::vector<Layer> dropped(layers.begin() + 1, layers.end());
    std::vector<std::string> spliced;  // what splice_out took out: the image's own layers
    for (size_t i = 0; i < own; ++i) {
        spliced.push_back(dropped[i].file);
    }
    layers.resize(1);
    co_await images_->retire_layers(std::move(dropped), e);
    co_await remove_spliced(images_, std::move(spliced));
    images_->env().log->info("{}: streamed; {} stands alone", e->name, layers.front().file);
    co_return Status{};
}

// The caller holds the image's lock, so the chain does not change meanwhile here; another host
// may still start using a layer between this check and the deletion, as with a commit.
Task<Result<size_t>> StreamJob::removable_own_layers() {
    size_t own = 0;
    std::set<FileId> ids;
    std::map<FileId, size_t> index_of;
    {
        const Export* e = image();
        const std::vector<Layer>& layers = e->chain.layers;
        const char separator = images_->store()->caps().snapshot_separator;
        while (own + 1 < layers.size() &&
               export_name_of(layers[own + 1].file, separator) == e->name &&
               images_->users_of(layers[own + 1], e).empty()) {
            ++own;
            if (layers[own].id != FileId{}) {
                ids.insert(layers[own].id);
                index_of[layers[own].id] = own;
            }
        }
    }
    if (own == 0) {
        co_return size_t{0};
    }
    Result<std::vector<UnservedUser>> users = co_await images_->unserved_users_of(std::move(ids));
    if (!users) {
        co_return make_error(users.error().errnum,
                             "{}: cannot tell whether an image this mount does not serve uses "
                             "one of its older layers, which the stream would delete: {}",
                             image()->name, users.error().message());
    }
    for (const UnservedUser& u : *users) {
        const size_t index = index_of[u.layer];
        own = std::min(own, index - 1);
        images_->env().log->info("{}: keeping {} and the layers below it: {} uses it",
                                 image()->name, image()->chain.layers[index].file, u.image);
    }
    co_return own;
}

// Finish (or undo) under one hold of the image's lock.
Task<Status> StreamJob::complete() {
    TimedMutex::Guard locked = co_await image()->ops.lock();
    Status st = co_await finish();
    if (!st) {
        co_await detach();
    }
    co_return st;
}

Task<Status> StreamJob::body() {
    // A layer that records no backing name cannot be made to stand alone (only qcow2 can).
    if (!image()->chain.top()->caps().backing_name) {
        co_return make_error(EINVAL, "{}: the top layer is not qcow2", image()->name);
    }
    CO_TRY(co_await attach());
    const uint64_t size = top_->size();
    // Progress is the part of the disk already gone through.
    set_total(size);
    for (uint64_t off = 0; off < size; off += kChunkBytes) {
        uint64_t n = std::min(kChunkBytes, size - off);
        Result<uint64_t> copied = co_await copy_chunk(off, n);
        Status st = copied ? Status{} : Status(std::move(copied).error());
        if (st) {
            // The limit is on what is copied; what the top holds already, or reads as
            // zeros, is gone through at once.
            st = co_await checkpoint(n, *copied);
        }
        if (!st) {
            co_await abandon();
            co_return st;
        }
    }
    if (Status ready = co_await enter_ready(); !ready) {
        co_await abandon();
        co_return ready;
    }
    co_return co_await complete();
}

}  // namespace imgfs
