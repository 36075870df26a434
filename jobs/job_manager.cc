#include "jobs/job_manager.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <map>
#include <set>

#include "core/chain_status.h"
#include "core/event_loop.h"
#include "core/log.h"
#include "jobs/chain_edit.h"
#include "jobs/commit_job.h"
#include "jobs/scan_plan.h"
#include "jobs/stream_job.h"

namespace imgfs {

namespace {

constexpr size_t kKeptJobs = 64;  // concluded jobs kept for status, oldest dropped first

// Of the `bytes` at `offset` a commit writes into `base`: those where the base holds no data of
// its own, whose writes allocate there. Where it does, the copy overwrites in place.
Task<Result<uint64_t>> bytes_to_allocate(std::shared_ptr<Node> base, uint64_t offset,
                                         uint64_t bytes) {
    const uint64_t end = offset + bytes;
    const uint64_t within = std::min(end, base->size());
    uint64_t out = end - std::max(offset, within);  // past the base's end: it grows
    for (uint64_t off = offset; off < within;) {
        CO_TRY_ASSIGN(BlockStatus st, co_await base->block_status(off, within - off));
        out += st.alloc == Alloc::kData ? 0 : st.bytes;
        off += st.bytes;
    }
    co_return out;
}

struct CommitBytes {
    uint64_t above = 0;     // held as data by the layers above the base: the copy
    uint64_t allocate = 0;  // of those, where the base holds no data: the space it needs
};

// What a commit of `e` into layers[base_index] copies, and how much of it needs new space.
// The space is an estimate, from below: an overwrite that still allocates (a qcow2 base's
// compressed clusters, or clusters an internal snapshot shares) is not counted, and a commit
// that runs out of space anyway fails as any write does, its chain unchanged. Counting every
// byte above instead refused commits that needed nothing, on the nearly full disk where a user
// commits to get an overlay's space back.
Task<Result<CommitBytes>> commit_bytes(std::shared_ptr<Export> e, size_t base_index) {
    BlockBackend* be = e->backend.get();
    std::shared_ptr<Node> base = e->chain.layers[base_index].node;
    const uint64_t size = be->size();
    CommitBytes out;
    for (uint64_t off = 0; off < size;) {
        CO_TRY_ASSIGN(ChainStatus st, co_await be->block_status_above(off, size - off));
        if (st.depth >= 0 && static_cast<size_t>(st.depth) < base_index && st.data) {
            out.above += st.bytes;
            CO_TRY_ASSIGN(uint64_t allocate, co_await bytes_to_allocate(base, off, st.bytes));
            out.allocate += allocate;
        }
        off += st.bytes;
    }
    co_return out;
}

// Free bytes in the image directory (the query can block: it runs off the loop).
Task<Result<uint64_t>> free_bytes(ImageSet* images) {
    Store* store = images->store();
    std::function<Result<uint64_t>()> query = [store]() -> Result<uint64_t> {
        TRY_ASSIGN(StoreSpace space, store->space());
        // A store that cannot tell its room is not called full.
        return space.known ? space.available_bytes() : UINT64_MAX;
    };
    co_return co_await images->offloader()->run<Result<uint64_t>>(std::move(query));
}

}  // namespace

// Refuses an edit (`what`: "committing", "reverting") that deletes or changes layers[0..base_index]
// of `e` while an image this mount does not serve also uses one of them: in a pool, another
// host's chain (its top is held under that host's RBD lock, so no scan here exports it); in a
// directory, an image a scan could not export, or one made since the last scan (a clone of the
// top made while NAME.raw was closed). Their headers are the only record of that use. The top
// counts too: both edits delete it. Runs off the loop: it reads every image's header.
Task<Status> refuse_unserved_users(ImageSet* images, std::shared_ptr<Export> e, size_t base_index,
                                   const char* what) {
    std::set<FileId> ids;
    std::map<FileId, std::string> file_of;
    for (size_t i = 0; i <= base_index; ++i) {
        const Layer& l = e->chain.layers[i];
        if (l.id != FileId{}) {
            ids.insert(l.id);
            file_of[l.id] = l.file;
        }
    }
    Result<std::vector<UnservedUser>> found = co_await images->unserved_users_of(std::move(ids));
    if (!found) {
        // Not knowing is refusing: an unseen user's chain would change under it.
        co_return make_error(found.error().errnum,
                             "{}: cannot tell whether an image this mount does not serve also "
                             "uses {}: {}",
                             e->name, e->chain.layers[base_index].file, found.error().message());
    }
    const std::vector<UnservedUser>& users = *found;
    if (!users.empty()) {
        co_return make_error(EBUSY,
                             "{}: {} is also used by {}, which this mount does not serve "
                             "(another host's image, or one it could not open); {} "
                             "would change that image",
                             e->name, file_of[users.front().layer], users.front().image, what);
    }
    co_return Status{};
}

RecordJob::RecordJob(EventLoop* loop, uint64_t id, std::string type, std::shared_ptr<Export> e,
                     uint64_t bytes)
    : Job(loop, id, std::move(type), std::move(e)) {
    set_total(bytes);
    add_done(bytes);
}

JobManager::JobManager(ImageSet* images, Logger* log)
    : images_(images), log_(log), scope_(images->env().loop), finished_(images->env().loop) {}

JobManager::~JobManager() = default;

Status JobManager::refuse_if_busy(const Export* e) const {
    if (running(e)) {
        return make_error(EBUSY, "{}: a {} job is running on it", e->name, e->job->type());
    }
    if (e->backend->fenced()) {
        return make_error(EIO, "{} is failed ({}); rescan once it is closed to reopen it", e->name,
                          e->backend->fence_reason());
    }
    if (images_->options().read_only) {
        return make_error(EROFS, "{}: mounted read-only", e->name);
    }
    return {};
}

Status JobManager::refuse_unfinished_edit(const Export* e) {
    // A chain edit that failed past its point of no return serves layers under their hidden
    // names (splice_out). Another edit could make one the active layer, or leave it named by
    // no header, and a scan deletes hidden names no header uses. The next mount finishes it.
    for (const Layer& l : e->chain.layers) {
        if (is_removing_name(l.file)) {
            return make_error(EBUSY,
                              "{}: an earlier chain edit did not finish ({} is in the chain "
                              "under its hidden name); the next mount finishes it",
                              e->name, l.file);
        }
    }
    return {};
}

Task<Result<bool>> JobManager::claim_and_verify(std::shared_ptr<Export> e) {
    // Every job changes or writes the chain: this host must be its writer (a pool image
    // another host writes is refused here, naming that host). Called after the command's own
    // checks: in a pool the claim takes the image's lock from every other host for the
    // life of the mount, which a refused command must not do. The checks hold for the chain
    // verified here, or verify_chain refuses (another host changed it meanwhile).
    CO_TRY_ASSIGN(bool fresh, co_await e->backend->claim_writes("claim", false));
    if (Status verified = co_await images_->verify_chain(e); !verified) {
        co_await give_back(e, fresh);
        co_return std::move(verified).error();
    }
    co_return fresh;
}

Task<void> JobManager::give_back(std::shared_ptr<Export> e, bool fresh) {
    if (!fresh) {
        co_return;
    }
    if (Status st = co_await e->backend->release_claim(); !st) {
        log_->warn("{}: a refused command keeps the image's write lock: {}", e->name,
                   st.error().message());
    }
}

bool JobManager::running(const Export* e) const {
    return e->job != nullptr && !e->job->finished();
}

Job* JobManager::record(std::shared_ptr<Job> job) {
    Job* raw = job.get();
    if (raw->image() != nullptr) {
        raw->image()->job = job;
    }
    jobs_.push_back(std::move(job));
    // Forget the oldest concluded jobs (an image keeps its own last job for status), those
    // that ended well first: a failure stays in the jobs file through a run of snapshots of
    // every image.
    while (jobs_.size() > kKeptJobs) {
        auto it = std::find_if(jobs_.begin(), jobs_.end(),
                               [](const auto& j) { return j->finished() && j->error().empty(); });
        if (it == jobs_.end()) {
            it = std::find_if(jobs_.begin(), jobs_.end(),
                              [](const auto& j) { return j->finished(); });
        }
        if (it == jobs_.end()) {
            break;
        }
        jobs_.erase(it);
    }
    return raw;
}

Task<void> JobManager::run_job(std::shared_ptr<Job> job, std::shared_ptr<Export> e) {
    log_->info("{}: {} job {} started", job->image_name(), job->type(), job->id());
    co_await job->run();
    if (job->error().empty()) {
        log_->info("{}: {} job {} done", job->image_name(), job->type(), job->id());
    } else if (job->cancelled() && job->error() == "cancelled") {
        // Asked for (a cancel verb, an unmount): not a failure, and the image's last error
        // stays what it was.
        log_->info("{}: {} job {} cancelled: {}", job->image_name(), job->type(), job->id(),
                   job->error());
    } else {
        log_->error("{}: {} job {} failed: {}", job->image_name(), job->type(), job->id(),
                    job->error());
        e->last_error = job->type() + ": " + job->error();
    }
    finished_.notify_all();
}

Task<Status> JobManager::start_commit(std::shared_ptr<Export> e, std::string base_file) {
    CO_TRY_ASSIGN(TimedMutex::Guard guard, co_await images_->lock_export(e, "commit"));
    co_return co_await start_commit_locked(std::move(e), std::move(base_file));
}

Task<Status> JobManager::start_commit_locked(std::shared_ptr<Export> e, std::string base_file) {
    CO_TRY(refuse_if_busy(e.get()));
    std::vector<Layer>& layers = e->chain.layers;
    if (layers.size() < 2) {
        co_return make_error(EINVAL, "{}: nothing to commit: {} has no backing file", e->name,
                             layers.front().file);
    }
    size_t base_index = 1;
    if (!base_file.empty()) {
        auto it = std::find_if(layers.begin() + 1, layers.end(),
                               [&base_file](const Layer& l) { return l.file == base_file; });
        if (it == layers.end()) {
            co_return make_error(EINVAL, "{}: '{}' is not a layer below the top (see info)",
                                 e->name, base_file);
        }
        base_index = static_cast<size_t>(it - layers.begin());
    }
    const Layer& base = layers[base_index];
    if (Child* storage = base.node->file(); storage != nullptr && storage->node()->read_only()) {
        // An image of another pool (allow_external_backing) is opened only for reading.
        co_return make_error(EROFS,
                             "{}: {} is opened read-only by this mount; a commit cannot "
                             "write it",
                             e->name, base.file);
    }
    if (base.node->size() > e->backend->size()) {
        // The switch would make the disk the base's size, and show the base's old bytes past
        // the end the guest knew (a commit only ever grows the base).
        co_return make_error(EINVAL,
                             "{}: {} ({} bytes) is larger than the disk ({} bytes); committing "
                             "into it would grow {}.raw. Shrink it first (qemu-img resize "
                             "--shrink) or stream instead",
                             e->name, base.file, base.node->size(), e->backend->size(), e->name);
    }
    // From the top: a commit deletes it and every layer down to the base.
    for (size_t i = 0; i <= base_index; ++i) {
        std::vector<Export*> others = images_->users_of(layers[i], e.get());
        if (!others.empty()) {
            co_return make_error(EBUSY,
                                 "{}: {} is also used by {}; committing would change that "
                                 "image",
                                 e->name, layers[i].file, others.front()->name);
        }
    }
    CO_TRY(co_await refuse_unserved_users(images_, e, base_index, "committing"));
    CO_TRY_ASSIGN(CommitBytes need, co_await commit_bytes(e, base_index));
    if (Result<uint64_t> free = co_await free_bytes(images_); free && need.allocate > *free) {
        co_return make_error(ENOSPC,
                             "{}: committing needs about {} bytes of new space in {}, but only "
                             "{} are free",
                             e->name, need.allocate, layers[base_index].file, *free);
    }
    CO_TRY(refuse_unfinished_edit(e.get()));
    CO_TRY(co_await claim_and_verify(e));
    const std::string base_name = layers[base_index].file;
    if (const std::string becomes =
            export_name_of(base_name, images_->store()->caps().snapshot_separator);
        becomes != e->name) {
        // The image is served under its root's name: a user who meant to keep the name wants
        // to know before the switch (a stream keeps it).
        images_->env().log->warn(
            "{}: committing into {}, which becomes the chain's root: once {}.raw is closed, a "
            "rescan or the next mount serves this image as {}.raw",
            e->name, base_name, e->name, becomes);
    }
    auto job = std::make_shared<CommitJob>(images_, next_id_++, e, base_index, need.above);
    record(job);
    scope_.spawn(run_job(std::move(job), std::move(e)));
    co_return Status{};
}

Task<Status> JobManager::start_stream(std::shared_ptr<Export> e) {
    CO_TRY_ASSIGN(TimedMutex::Guard guard, co_await images_->lock_export(e, "stream"));
    CO_TRY(refuse_if_busy(e.get()));
    if (e->chain.layers.size() < 2) {
        co_return make_error(EINVAL, "{}: nothing to stream: {} has no backing file", e->name,
                             e->chain.layers.front().file);
    }
    CO_TRY(refuse_unfinished_edit(e.get()));
    CO_TRY(co_await claim_and_verify(e));
    auto job = std::make_shared<StreamJob>(images_, next_id_++, e);
    record(job);
    scope_.spawn(run_job(std::move(job), std::move(e)));
    co_return Status{};
}

Status JobManager::control(Export* e, const std::string& command) {
    if (e->job == nullptr) {
        return make_error(EINVAL, "{}: no job", e->name);
    }
    if (command == "cancel") {
        return e->job->cancel();
    }
    if (command == "pause") {
        return e->job->pause();
    }
    if (command == "resume") {
        return e->job->resume();
    }
    if (command.rfind("speed ", 0) == 0) {
        char* end = nullptr;
        std::string v = command.substr(6);
        errno = 0;
        unsigned long long n = std::strtoull(v.c_str(), &end, 10);
        // strtoull takes "-1" (as ULLONG_MAX) and saturates on overflow: refuse both.
        if (v.empty() || std::isdigit(static_cast<unsigned char>(v[0])) == 0 || *end != '\0' ||
            errno == ERANGE) {
            return make_error(EINVAL, "speed takes a number of bytes per second (got '{}')", v);
        }
        return e->job->set_speed(n);
    }
    return make_error(EINVAL, "unknown job command '{}' (cancel, pause, resume, speed N)", command);
}

std::string JobManager::job_json(const Export* e) const {
    return e->job != nullptr ? e->job->status_json() : std::string();
}

std::string JobManager::jobs_jsonl() const {
    std::string out;
    for (const auto& j : jobs_) {
        out += j->status_json() + "\n";
    }
    return out;
}

Task<void> JobManager::shutdown() {
    for (const auto& j : jobs_) {
        if (!j->finished()) {
            // A job that cannot be cancelled any more (it is completing) ends by itself, at
            // full speed; the join below waits for it either way.
            if (Status st = j->cancel(); !st) {
                log_->info("shutdown: {}; waiting for it", st.error().message());
                j->lift_speed_limit();
            }
        }
    }
    co_await scope_.join();
}

Task<void> JobManager::wait(std::shared_ptr<Export> e) {
    while (running(e.get())) {
        co_await finished_.wait();
    }
}

}  // namespace imgfs
