#include "jobs/commit_job.h"

#include <algorithm>

#include "core/chain_status.h"
#include "core/drain.h"
#include "core/event_loop.h"
#include "core/log.h"
#include "core/task_scope.h"
#include "core/transaction.h"
#include "jobs/chain_edit.h"
#include "jobs/job_manager.h"

namespace imgfs {

namespace {

constexpr uint64_t kGranuleBytes = 64 * 1024;
constexpr uint64_t kMaxCopyBytes = 1 << 20;
constexpr int kWorkers = 4;
// Switch to writing guest writes through once this little is left (or after a few passes).
constexpr uint64_t kSyncThresholdBytes = 16ULL << 20;
constexpr int kAsyncPasses = 3;
// Tries to switch when guest writes keep failing (each leaves its range to copy again).
constexpr int kPivotAttempts = 5;

}  // namespace

CommitJob::CommitJob(ImageSet* images, uint64_t id, std::shared_ptr<Export> e, size_t base_index,
                     uint64_t estimate)
    : Job(images->env().loop, id, "commit", std::move(e)),
      images_(images),
      base_index_(base_index) {
    base_file_ = image()->chain.layers[base_index].file;
    set_total(estimate);
}

CommitJob::~CommitJob() = default;

std::optional<uint64_t> CommitJob::remaining_bytes() const {
    if (!scanned_ || dirty_ == nullptr) {
        return std::nullopt;  // the estimate stands until the scan has found every range
    }
    return dirty_->dirty_bytes() + copying_bytes_;
}

void CommitJob::release_nodes() {
    if (target_ != nullptr) {
        // Left over only when the filter could not be taken out (the image is fenced): our own
        // edge goes anyway, so that the base's file is not kept open for a concluded job.
        Transaction tx(images_->env().graph);
        tx.detach(target_);
        if (Status st = tx.commit_removal(); !st) {
            images_->env().log->warn(
                "{}: permissions not refreshed after the commit job let go: {}", image_name(),
                st.error().message());
        }
        target_ = nullptr;
    }
    for (FileId id : changing_) {
        images_->unmark_changing(id);
    }
    changing_.clear();
    dirty_.reset();
    filter_.reset();
    top_.reset();
    base_.reset();
}

Task<Status> CommitJob::attach() {
    TimedMutex::Guard locked = co_await image()->ops.lock();
    Export* e = image();
    // Asked again under the lock, before the middle layers are marked: the start checked
    // with the lock held, but released it before this job took it, and a rescan waiting for
    // it may have served an image made on a middle layer (or on the base) in between.
    for (size_t i = 1; i <= base_index_; ++i) {
        const Layer& layer = e->chain.layers[i];
        if (std::vector<Export*> others = images_->users_of(layer, e); !others.empty()) {
            co_return make_error(EBUSY,
                                 "{}: {} is also used by {}; committing would change that "
                                 "image",
                                 e->name, layer.file, others.front()->name);
        }
    }
    top_ = e->chain.layers.front().node;
    base_ = e->chain.layers[base_index_].node;
    std::vector<std::shared_ptr<Node>> nodes{top_};
    DrainGuard drained = co_await drain(nodes);
    // Drained: making it writable may claim its storage (in a pool, take the RBD lock) and
    // reread its metadata, which must not happen under a read in flight.
    CO_TRY(co_await base_->set_writable(true));
    if (Status grown = co_await grow_base(); !grown) {
        if (Status back = co_await back_to_read_only(images_, base_.get()); !back) {
            images_->env().log->warn("{}: {} stays writable after the commit could not start: {}",
                                     image_name(), base_->name(), back.error().message());
        }
        co_return grown;
    }
    Transaction tx(images_->env().graph);
    filter_ = MirrorFilter::create(images_->env(), e->name + " (commit)", &tx, top_);
    tx.replace_node(top_.get(), filter_);
    // The layer just above the base lets us write under it; nobody else uses the base (checked
    // when the job was started, and the permissions refuse it if that changed).
    Child* above = e->chain.layers[base_index_ - 1].node->backing();
    tx.set_extra_shared(above, perm::kWrite);
    target_ = tx.attach(this, base_, ChildRole::kUser, "commit target",
                        perm::kConsistentRead | perm::kWrite, perm::kAll);
    Status st = tx.commit();
    if (!st) {
        target_ = nullptr;
        filter_.reset();
        // The job fails with the transaction's error; the base merely stays writable.
        Status back = co_await back_to_read_only(images_, base_.get());
        if (!back) {
            images_->env().log->warn("{}: {} stays writable after the commit could not start: {}",
                                     image_name(), base_->name(), back.error().message());
        }
        co_return st;
    }
    for (size_t i = 1; i < base_index_; ++i) {
        const FileId id = e->chain.layers[i].id;
        if (id != FileId{}) {
            images_->mark_changing(
                id, fmt::format("the commit of {} into {} runs ({} lies between its top and its "
                                "base, so what it shows changes)",
                                e->name, base_file_, e->chain.layers[i].file));
            changing_.push_back(id);
        }
    }
    dirty_ = std::make_unique<DirtyBitmap>(top_->size(), kGranuleBytes);
    filter_->set_dirty(dirty_.get());
    filter_->set_target(target_);
    filter_->set_mode(MirrorFilter::Mode::kAsync);
    co_return Status{};
}

// NAME.raw grows by growing the top alone, so the base may be shorter than the image. It must
// hold the whole disk before it becomes the image: past its end the copy would write where
// nobody reads, and the switch would shrink NAME.raw to the base's size. The grown range reads
// as zeros, as the image did there: a qcow2 grow zeroes what a longer backing file below the
// base would show, durably before the new size (Qcow2Node::zero_before_growing).
// Caller: the drain holder.
Task<Status> CommitJob::grow_base() {
    const uint64_t old_size = base_->size();
    const uint64_t new_size = top_->size();
    if (old_size >= new_size) {
        co_return Status{};
    }
    // set_writable leaves the permissions of its edges to the caller: refreshed first.
    Transaction refresh(images_->env().graph);
    Status st = refresh.commit();
    if (st) {
        st = co_await base_->truncate(new_size);
    }
    if (!st) {
        co_return make_error(st.error().errnum, "{}: growing {} to {} bytes, the image's size: {}",
                             image_name(), base_->name(), new_size, st.error().message());
    }
    images_->env().log->info("{}: grew {} from {} to {} bytes, the image's size", image_name(),
                             base_->name(), old_size, new_size);
    co_return Status{};
}

// The caller holds the image's lock.
Task<void> CommitJob::detach_after_failure() {
    if (!filter_) {
        co_return;
    }
    std::shared_ptr<MirrorFilter> filter = std::move(filter_);
    Status removed = co_await remove_mirror_filter(images_->env().graph, filter, top_, target_);
    if (!removed) {
        // The filter stays in the fenced graph; it must not reach into this job any more.
        filter->set_target(nullptr);
        filter->set_dirty(nullptr);
        images_->fence(image(), removed.error().message());
        co_return;
    }
    target_ = nullptr;
    // The base keeps what was copied: it lies under the layers that still hold it, so the
    // guest's view does not depend on these steps, and the job's own error is what it reports.
    Logger* log = images_->env().log;
    const std::string name = image_name();
    if (Status st = co_await base_->flush(); !st) {
        log->error("{}: flushing {} after the commit was abandoned: {}", name, base_->name(),
                   st.error().message());
    }
    if (Status st = co_await base_->set_writable(false); !st) {
        log->warn("{}: {} stays writable after the commit was abandoned: {}", name, base_->name(),
                  st.error().message());
    }
    Transaction refresh(images_->env().graph);
    // The chain's own edge to the base stops letting another user write it (start()).
    if (Child* above = image()->chain.layers[base_index_ - 1].node->backing(); above != nullptr) {
        refresh.set_extra_shared(above, 0);
    }
    if (Status st = refresh.commit(); !st) {
        log->warn("{}: permissions not refreshed after the commit was abandoned: {}", name,
                  st.error().message());
    }
}

Task<void> CommitJob::abandon() {
    TimedMutex::Guard locked = co_await image()->ops.lock();
    co_await detach_after_failure();
}

Task<Status> CommitJob::copy_range(uint64_t offset, uint64_t bytes, MutBuf scratch) {
    // A copy is one of the filter's requests: a drained section on the image (the claim of
    // a pool top, which rereads its metadata) waits for it and holds the next one back, as it
    // does the guest's. The job's edges are not above the filter, so it is not quiesced.
    co_await filter_->wait_unquiesced();
    InFlightGuard counted(filter_.get());
    // Excludes guest writes to the range (every one holds a non-serialising request): in sync
    // mode one landing between our read and our write would be overwritten with older data.
    RangeLock::Request req(filter_->tracker(), offset, bytes, true);
    co_await filter_->tracker()->acquire(&req);
    // Clean before reading: a guest write completing after the read marks it dirty again.
    dirty_->clear(offset, bytes);
    copying_bytes_ += bytes;  // back out below, before the caller counts it done
    MutBuf buf = scratch.subspan(0, bytes);
    Status st = co_await filter_->top()->read(offset, buf);
    // Not `st = cond ? co_await a : co_await b`: GCC 12 destroys the temporary of such a
    // conditional twice when it holds an error (a double free on every failed write).
    if (st && is_zero(buf)) {
        st = co_await target_->write_zeroes(offset, bytes, false);
    } else if (st) {
        st = co_await target_->write(offset, buf);
    }
    if (!st) {
        dirty_->set(offset, bytes);
    }
    copying_bytes_ -= bytes;
    co_return st;
}

Task<void> CommitJob::copy_worker(uint64_t* cursor, Status* result) {
    const uint64_t size = dirty_->size();
    // One buffer per worker for the whole job: a fresh 1 MiB buffer per chunk made glibc grow
    // and fragment the heap (the daemon's peak RSS doubled during a commit).
    AlignedBuffer scratch(kMaxCopyBytes);
    while (*result && *cursor < size) {
        std::optional<uint64_t> start = dirty_->next_dirty(*cursor);
        if (!start) {
            *cursor = size;
            break;
        }
        uint64_t end = *start + kGranuleBytes;
        while (end < size && end - *start < kMaxCopyBytes && dirty_->test(end)) {
            end += kGranuleBytes;
        }
        end = std::min(end, size);
        *cursor = end;  // claimed
        Status st = co_await copy_range(*start, end - *start, scratch.span());
        if (st) {
            st = co_await checkpoint(end - *start);
        }
        if (!st && *result) {
            *result = std::move(st);
            stop_units();  // the other workers need not sleep off the rate limit first
        }
    }
}

Task<Status> CommitJob::copy_pass() {
    uint64_t cursor = 0;
    Status result;
    TaskScope workers(loop_);
    for (int i = 0; i < kWorkers; ++i) {
        workers.spawn(copy_worker(&cursor, &result));
    }
    co_await workers.join();
    co_return result;
}

// The caller holds the image's lock.
Task<Result<bool>> CommitJob::pivot() {
    // A directory changed under the job (a layer deleted or replaced) stops it here, before
    // anything on disk is touched.
    CO_TRY(co_await images_->verify_chain(image_ref()));
    // Asked again: the job may have run for hours, and an image made on a middle layer since
    // (a clone of a snapshot) would lose it.
    CO_TRY(co_await refuse_unserved_users(images_, image_ref(), base_index_, "committing"));
    // The top too: the switch deletes it with the middle layers.
    for (size_t i = 0; i < base_index_; ++i) {
        const Layer& middle = image()->chain.layers[i];
        if (std::vector<Export*> others = images_->users_of(middle, image()); !others.empty()) {
            co_return make_error(EBUSY, "{}: {} is also used by {}; the switch would delete it",
                                 image_name(), middle.file, others.front()->name);
        }
    }
    // The base too: the switch below moves the image's edge from the filter to the base, and
    // a drained section reaches a new user only through the node it links to. Drained on the
    // filter alone, guest writes would reach the base during the top's hide.
    std::vector<std::shared_ptr<Node>> nodes{filter_, base_};
    DrainGuard drained = co_await drain(nodes);
    if (dirty_->dirty_bytes() != 0) {
        co_return false;  // a guest write failed since the last pass: complete() copies again
    }
    // Everything above the base is in it: durable first, then the chain on disk skips the
    // middle layers (the top's view is unchanged), then the export moves to the base.
    CO_TRY(co_await target_->flush());
    if (base_index_ > 1) {
        CO_TRY(co_await splice_out(images_, image_ref(), 1, base_index_ - 1, false));
    }
    Transaction tx(images_->env().graph);
    tx.replace_node(filter_.get(), base_);
    tx.detach(filter_->top());
    tx.detach(target_);
    for (size_t i = 0; i < base_index_; ++i) {
        tx.detach(image()->chain.layers[i].node->backing());
    }
    CO_TRY(tx.commit());
    target_ = nullptr;
    // The top's name goes before the drain ends and guest writes reach the base: while it is
    // there, a crash brings back top -> base as the image, which would hide every write the
    // base took since. Inside the drain the two still show the same bytes.
    const std::string top_file = image()->chain.layers.front().file;
    std::string why_kept;
    dropped_top_ = co_await drop_top_file(images_, top_file, &why_kept);
    if (dropped_top_ == DroppedTop::kKept) {
        // No write may reach the base while the top can come back over it. Fenced inside the
        // drain: the top and the base still show the same bytes, so a crash or a remount
        // serves what the guest last saw.
        fenced_why_ = fmt::format(
            "committed, but {}; the image refuses I/O until a rescan reopens it (once "
            "closed)",
            why_kept);
        images_->fence(image(), fenced_why_);
    }
    co_return true;
}

// The caller holds the image's lock.
Task<void> CommitJob::finish() {
    Export* e = image();
    auto end = e->chain.layers.begin() + static_cast<std::ptrdiff_t>(base_index_);
    std::vector<Layer> merged(e->chain.layers.begin(), end);
    e->chain.layers.erase(e->chain.layers.begin(), end);
    std::string top_file = merged.front().file;
    std::vector<std::string> spliced;  // the middle layers splice_out took out
    for (size_t i = 1; i < merged.size(); ++i) {
        spliced.push_back(merged[i].file);
    }
    filter_.reset();
    top_.reset();
    // Closed and released before the top goes (pivot hid its name already).
    co_await images_->retire_layers(std::move(merged), e);
    co_await remove_spliced(images_, std::move(spliced));
    if (dropped_top_ == DroppedTop::kHidden) {
        co_await remove_hidden(images_, top_file);
    }
    images_->env().log->info("{}: committed; {} is now the active layer", e->name,
                             e->chain.layers.front().file);
}

// Pivot and finish under one hold of the image's lock (no other graph change in between).
Task<Status> CommitJob::complete() {
    TimedMutex::Guard locked = co_await image()->ops.lock();
    // A range a failed guest write left dirty is copied again below, under the image's lock:
    // at the job's rate limit that would hold every snapshot, revert and rescan of the image
    // for as long as the copy takes. The job cannot be cancelled any more anyway.
    lift_speed_limit();
    for (int attempt = 1;; ++attempt) {
        Result<bool> pivoted = co_await pivot();
        if (pivoted && *pivoted) {
            co_await finish();
            if (!fenced_why_.empty()) {
                co_return make_error(EIO, "{}", fenced_why_);
            }
            co_return Status{};
        }
        if (!pivoted) {
            co_await detach_after_failure();
            co_return std::move(pivoted).error();
        }
        // A guest write failed since the last pass (on the top, or on its way to the base)
        // and left its range dirty: copied again, then another try. The guest got its error;
        // one failed write is no reason to throw away the whole commit.
        Status copied;
        if (attempt < kPivotAttempts) {
            copied = co_await copy_pass();
        } else {
            copied = make_error(EIO, "{}; commit abandoned", pivot_failure());
        }
        if (!copied) {
            co_await detach_after_failure();
            co_return copied;
        }
    }
}

std::string CommitJob::pivot_failure() const {
    if (filter_->mirror_failures() != 0) {
        return fmt::format("writes to {} kept failing", base_->name());
    }
    return fmt::format("guest writes to {} kept failing while the commit tried to finish",
                       filter_->top()->node()->name());
}

Task<Status> CommitJob::body() {
    CO_TRY(co_await attach());
    // What the layers above the base hold must reach it.
    Node* top = top_.get();
    for (uint64_t off = 0; off < top->size();) {
        Result<ChainStatus> st = co_await block_status_above(top, off, top->size() - off);
        if (!st) {
            co_await abandon();
            co_return std::move(st).error();
        }
        if (st->depth >= 0 && static_cast<size_t>(st->depth) < base_index_) {
            dirty_->set(off, st->bytes);
        }
        off += st->bytes;
    }
    set_total(dirty_->dirty_bytes());
    scanned_ = true;
    for (int pass = 0;; ++pass) {
        Status st = co_await copy_pass();
        if (!st) {
            co_await abandon();
            co_return st;
        }
        if (filter_->mode() == MirrorFilter::Mode::kAsync &&
            (dirty_->dirty_bytes() <= kSyncThresholdBytes || pass + 1 >= kAsyncPasses)) {
            filter_->set_mode(MirrorFilter::Mode::kSync);
            // Writes that began before the switch mark their ranges dirty when they end:
            // waited for, so the next pass sees every range the target still lacks.
            co_await filter_->wait_unmirrored_writes();
            continue;  // one more pass for what was dirtied before the switch
        }
        if (filter_->mode() != MirrorFilter::Mode::kSync || dirty_->dirty_bytes() != 0) {
            continue;
        }
        if (Status ready = co_await enter_ready(); !ready) {
            co_await abandon();
            co_return ready;
        }
        co_return co_await complete();
    }
}

}  // namespace imgfs
