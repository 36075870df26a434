#include "fuse/standard_control.h"

namespace imgfs {

StandardControl::StandardControl(ImageSet* images, JobManager* jobs, Logger* log)
    : images_(images), jobs_(jobs), log_(log) {
    image_files_ = {
        {ControlFile::kInfo, "info", false},
    };
    global_files_ = {
        {ControlFile::kRescan, "rescan", true},
        {ControlFile::kJobs, "jobs", false},
    };
}

Task<std::string> StandardControl::read(Export* e, ControlFile file) {
    switch (file) {
        case ControlFile::kInfo:
            co_return co_await images_->info_json(e) + "\n";
        case ControlFile::kJobs:
            co_return std::string();
        default:
            co_return std::string();
    }
}

Status StandardControl::refuse(Export* e, Error error) {
    std::string where = e != nullptr ? e->name : std::string(".control");
    log_->warn("{}: {}", where, error.message());
    if (e != nullptr) {
        e->last_error = error.message();
    }
    return error;
}

Task<Status> StandardControl::write(Export* e, ControlFile file, std::string command) {
    Result<std::string> cmd = parse_command(command);
    if (!cmd) {
        co_return refuse(e, std::move(cmd).error());
    }
    Status st = co_await run(e, file, std::move(*cmd));
    if (!st) {
        co_return refuse(e, std::move(st).error());
    }
    co_return Status{};
}

Task<Status> StandardControl::run(Export* /*e*/, ControlFile file, std::string command) {
    switch (file) {
        case ControlFile::kRescan:
            if (!command.empty()) {
                co_return make_error(EINVAL, "rescan takes no argument (got '{}')", command);
            }
            co_return co_await images_->scan();
        default:
            co_return make_error(EINVAL, "this control file takes no commands");
    }
}

}  // namespace imgfs
