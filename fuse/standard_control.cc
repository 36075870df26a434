#include "fuse/standard_control.h"

#include <set>
#include <sstream>

#include "core/json.h"
#include "jobs/job_manager.h"

namespace imgfs {

StandardControl::StandardControl(ImageSet* images, JobManager* jobs, Logger* log)
    : images_(images), jobs_(jobs), log_(log) {
    image_files_ = {
        {ControlFile::kSnapshot, "snapshot", true}, {ControlFile::kCommit, "commit", true},
        {ControlFile::kRevert, "revert", true},     {ControlFile::kStream, "stream", true},
        {ControlFile::kJob, "job", true},           {ControlFile::kInfo, "info", false},
    };
    global_files_ = {
        {ControlFile::kGroupSnapshot, "snapshot", true},
        {ControlFile::kRescan, "rescan", true},
        {ControlFile::kJobs, "jobs", false},
        {ControlFile::kSkipped, "skipped", false},
    };
}

Task<std::string> StandardControl::read(std::shared_ptr<Export> e, ControlFile file) {
    switch (file) {
        case ControlFile::kInfo:
            co_return co_await images_->info_json(e) + "\n";
        case ControlFile::kSnapshot:
        case ControlFile::kRevert: {
            // The chain, top first.
            std::string out;
            for (const Layer& l : e->chain.layers) {
                out += l.file + "\n";
            }
            co_return out;
        }
        case ControlFile::kCommit:
        case ControlFile::kStream:
        case ControlFile::kJob: {
            std::string j = jobs_->job_json(e.get());
            co_return j.empty() ? j : j + "\n";
        }
        case ControlFile::kJobs:
            co_return jobs_->jobs_jsonl();
        case ControlFile::kSkipped:
            co_return skipped_jsonl();
        default:
            co_return std::string();
    }
}

Status StandardControl::refuse(Export* e, Error error, uint32_t caller) {
    std::string where = e != nullptr ? e->name : std::string(".control");
    log_->warn("{}: {}", where, error.message());
    if (e != nullptr) {
        // With the errno's text: a context alone ("cannot create vm1@s1.qcow2") hides the
        // cause (no space, permission, a name taken).
        e->last_error = error.message();
        e->caller_errors.set(caller, error.message());
    }
    return error;
}

Task<Status> StandardControl::write(std::shared_ptr<Export> e, ControlFile file,
                                    std::string command, uint32_t caller) {
    if (images_->options().read_only && file != ControlFile::kRescan) {
        // Whatever the command says: on a read-only mount only a rescan runs.
        co_return refuse(e.get(),
                         make_error(EROFS, "{}: mounted read-only",
                                    e != nullptr ? e->name : std::string(".control")),
                         caller);
    }
    Result<std::string> cmd = parse_command(command);
    if (!cmd) {
        co_return refuse(e.get(), std::move(cmd).error(), caller);
    }
    Status st = co_await run(e, file, std::move(*cmd), caller);
    if (!st) {
        co_return refuse(e.get(), std::move(st).error(), caller);
    }
    if (e != nullptr) {
        e->last_error.clear();
        e->caller_errors.set(caller, {});
    }
    co_return Status{};
}

// What the last scan left out or found wrong, one JSON object per line.
std::string StandardControl::skipped_jsonl() const {
    std::string out;
    for (const ScanProblem& p : images_->problems()) {
        JsonWriter w;
        w.begin_object();
        w.field("file", p.file);
        w.field("reason", p.reason);
        w.end_object();
        out += w.take() + "\n";
    }
    return out;
}

// "SNAP" snapshots every exported image, "SNAP NAME NAME..." the images named; all or nothing.
// Every image of the group keeps the outcome as its last error (a reason, or none once it
// succeeded): the global file has no info of its own, and the CLI reads the reason from there.
Task<Status> StandardControl::group_snapshot(std::string command, uint32_t caller) {
    std::istringstream words(command);
    std::string snap;
    words >> snap;
    if (snap.empty()) {
        co_return make_error(EINVAL, "group snapshot takes 'SNAP' or 'SNAP NAME NAME...'");
    }
    std::vector<std::shared_ptr<Export>> group;
    std::set<std::string> named;
    Status st;
    // Every name is looked at, past a bad one too: each image named keeps the reason.
    for (std::string name; words >> name;) {
        std::shared_ptr<Export> x = images_->find(name);
        Status bad;
        if (!named.insert(name).second) {
            bad = make_error(EINVAL, "group snapshot: image '{}' is named twice", name);
        } else if (x == nullptr) {
            bad = make_error(EINVAL, "group snapshot: no image '{}'", name);
        } else {
            group.push_back(std::move(x));
        }
        if (!bad && st) {
            st = std::move(bad);  // the first problem is the one reported
        }
    }
    if (named.empty()) {
        group = images_->exports();
    }
    if (st) {
        std::vector<std::pair<std::shared_ptr<Export>, std::string>> targets;
        for (const auto& x : group) {
            targets.emplace_back(x, snap);
        }
        st = co_await jobs_->group_snapshot(std::move(targets));
    }
    for (const auto& x : group) {
        x->last_error =
            st ? std::string() : fmt::format("group snapshot '{}': {}", snap, st.error().message());
        x->caller_errors.set(caller, x->last_error);
    }
    co_return st;
}

Task<Status> StandardControl::run(std::shared_ptr<Export> e, ControlFile file, std::string command,
                                  uint32_t caller) {
    switch (file) {
        case ControlFile::kRescan:
            if (!command.empty()) {
                co_return make_error(EINVAL, "rescan takes no argument (got '{}')", command);
            }
            co_return co_await images_->scan();
        case ControlFile::kSnapshot:
            co_return co_await jobs_->snapshot(e, std::move(command));
        case ControlFile::kGroupSnapshot:
            co_return co_await group_snapshot(std::move(command), caller);
        case ControlFile::kCommit:
            if (command.empty()) {
                co_return co_await jobs_->start_commit(e, "");
            }
            if (command.rfind("base=", 0) == 0 && command.size() > 5) {
                co_return co_await jobs_->start_commit(e, command.substr(5));
            }
            co_return make_error(EINVAL, "commit takes nothing or base=FILE (got '{}')", command);
        case ControlFile::kRevert:
            if (!command.empty()) {
                co_return make_error(EINVAL, "revert takes no argument (got '{}')", command);
            }
            co_return co_await jobs_->revert(e);
        case ControlFile::kStream:
            if (!command.empty()) {
                co_return make_error(EINVAL, "stream takes no argument (got '{}')", command);
            }
            co_return co_await jobs_->start_stream(e);
        case ControlFile::kJob:
            co_return jobs_->control(e.get(), command);
        default:
            co_return make_error(EINVAL, "this control file takes no commands");
    }
}

}  // namespace imgfs
