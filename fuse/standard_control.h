// StandardControl: the control files of docs/design.md §3.2 over an ImageSet and its jobs.
#pragma once

#include "core/log.h"
#include "fuse/control.h"

namespace imgfs {

class JobManager;

class StandardControl final : public ControlPlane {
  public:
    StandardControl(ImageSet* images, JobManager* jobs, Logger* log);

    [[nodiscard]] const std::vector<ControlFileSpec>& image_files() const override {
        return image_files_;
    }
    [[nodiscard]] const std::vector<ControlFileSpec>& global_files() const override {
        return global_files_;
    }
    Task<std::string> read(std::shared_ptr<Export> e, ControlFile file) override;
    Task<Status> write(std::shared_ptr<Export> e, ControlFile file, std::string command,
                       uint32_t caller) override;

  private:
    Task<Status> run(std::shared_ptr<Export> e, ControlFile file, std::string command,
                     uint32_t caller);
    Task<Status> group_snapshot(std::string command, uint32_t caller);
    [[nodiscard]] std::string skipped_jsonl() const;
    Status refuse(Export* e, Error error, uint32_t caller);

    ImageSet* images_;
    JobManager* jobs_;
    Logger* log_;
    std::vector<ControlFileSpec> image_files_;
    std::vector<ControlFileSpec> global_files_;
};

}  // namespace imgfs
