#include "jobs/job_manager.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>

#include <sys/statvfs.h>

#include "core/chain_status.h"
#include "core/event_loop.h"
#include "core/log.h"
#include "jobs/commit_job.h"
#include "jobs/stream_job.h"

namespace imgfs {

namespace {

constexpr size_t kKeptJobs = 64;  // concluded jobs kept for status, oldest dropped first

// Guest bytes held (as data or zeros) by the layers above `base_index`: what a commit writes.
Task<Result<uint64_t>> bytes_above(Export* e, size_t base_index) {
    Node* top = e->chain.top().get();
    uint64_t total = 0;
    for (uint64_t off = 0; off < top->size();) {
        CO_TRY_ASSIGN(ChainStatus st, co_await block_status_above(top, off, top->size() - off));
        if (st.depth >= 0 && static_cast<size_t>(st.depth) < base_index && st.data) {
            total += st.bytes;
        }
        off += st.bytes;
    }
    co_return total;
}

}  // namespace

RecordJob::RecordJob(EventLoop* loop, uint64_t id, std::string type, Export* e, uint64_t bytes)
    : Job(loop, id, std::move(type), e) {
    set_total(bytes);
    add_done(bytes);
}

JobManager::JobManager(ImageSet* images, Logger* log)
    : images_(images), log_(log), scope_(images->env().loop), finished_(images->env().loop) {}

JobManager::~JobManager() = default;

Status JobManager::refuse_if_busy(const Export* e) const {
    if (running(e)) {
        return make_error(EBUSY, "{}: a {} job is already running", e->name, e->job->type());
    }
    if (images_->options().read_only) {
        return make_error(EROFS, "{}: mounted read-only", e->name);
    }
    return {};
}

bool JobManager::running(const Export* e) const {
    return e->job != nullptr && !e->job->finished();
}

Job* JobManager::record(std::unique_ptr<Job> job) {
    Job* raw = job.get();
    if (raw->image() != nullptr) {
        raw->image()->job = raw;
    }
    jobs_.push_back(std::move(job));
    // Forget the oldest concluded jobs that no image points at any more.
    while (jobs_.size() > kKeptJobs) {
        auto it = std::find_if(jobs_.begin(), jobs_.end(), [this](const auto& j) {
            Export* img = images_->find_id(j->image_id());
            return j->finished() && (img == nullptr || img->job != j.get());
        });
        if (it == jobs_.end()) {
            break;
        }
        jobs_.erase(it);
    }
    return raw;
}

Task<void> JobManager::run_job(Job* job) {
    log_->info("{}: {} job {} started", job->image_name(), job->type(), job->id());
    co_await job->run();
    if (job->error().empty()) {
        log_->info("{}: {} job {} done", job->image_name(), job->type(), job->id());
    } else {
        log_->error("{}: {} job {} failed: {}", job->image_name(), job->type(), job->id(),
                    job->error());
        if (Export* e = images_->find_id(job->image_id())) {
            e->last_error = job->type() + ": " + job->error();
        }
    }
    finished_.notify_all();
}

Task<Status> JobManager::start_commit(Export* e, std::string base_file) {
    CO_TRY(refuse_if_busy(e));
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
    for (size_t i = 1; i <= base_index; ++i) {
        std::vector<Export*> others = images_->users_of(layers[i].node.get(), e);
        if (!others.empty()) {
            co_return make_error(EBUSY,
                                 "{}: {} is also used by {}; committing would change that "
                                 "image",
                                 e->name, layers[i].file, others.front()->name);
        }
    }
    CO_TRY_ASSIGN(uint64_t need, co_await bytes_above(e, base_index));
    struct statvfs vfs {};
    if (::fstatvfs(images_->dir_fd(), &vfs) == 0) {
        uint64_t free_bytes = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
        if (need > free_bytes) {
            co_return make_error(ENOSPC,
                                 "{}: committing needs up to {} bytes in {}, but only {} "
                                 "are free",
                                 e->name, need, layers[base_index].file, free_bytes);
        }
    }
    Job* job = record(std::make_unique<CommitJob>(images_, next_id_++, e, base_index, need));
    scope_.spawn(run_job(job));
    co_return Status{};
}

Task<Status> JobManager::start_stream(Export* e) {
    CO_TRY(refuse_if_busy(e));
    if (e->chain.layers.size() < 2) {
        co_return make_error(EINVAL, "{}: nothing to stream: {} has no backing file", e->name,
                             e->chain.layers.front().file);
    }
    Job* job = record(std::make_unique<StreamJob>(images_, next_id_++, e));
    scope_.spawn(run_job(job));
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
            (void)j->cancel();
        }
    }
    co_await scope_.join();
}

Task<void> JobManager::wait(const Export* e) {
    while (running(e)) {
        co_await finished_.wait();
    }
}

}  // namespace imgfs
