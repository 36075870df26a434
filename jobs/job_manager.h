// JobManager: starts, refuses and tracks the operations of docs/design.md §5 on the exports of an
// ImageSet. Snapshot and revert complete within the call; commit and stream run as jobs in the
// manager's scope. Refusals carry the errno the control file returns (EBUSY, EINVAL, EEXIST,
// ENOSPC, EROFS, EIO) and a reason.
//
// Every operation here follows the ImageSet's graph-change rule: it holds the image's `ops` lock
// (a group snapshot: every image's, in ascending id order) while it checks and changes the
// image, waiting a bounded time for another short operation, and is refused with EBUSY while a
// job holds the image. A job takes the lock again for each step that changes the graph.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/task_scope.h"
#include "jobs/image_set.h"
#include "jobs/job.h"

namespace imgfs {

/// Refuses an edit (`what`: "committing", "reverting") that deletes or changes
/// layers[0..base_index] of `e` while an image this mount does not serve uses one of them (in a
/// pool, another host's chain); also refuses when that cannot be told. Reads headers off the loop.
Task<Status> refuse_unserved_users(ImageSet* images, std::shared_ptr<Export> e, size_t base_index,
                                   const char* what);

class JobManager {
  public:
    JobManager(ImageSet* images, Logger* log);
    JobManager(const JobManager&) = delete;
    JobManager& operator=(const JobManager&) = delete;
    ~JobManager();

    /// Live external snapshot: NAME@SNAP.qcow2 becomes the active layer.
    Task<Status> snapshot(std::shared_ptr<Export> e, std::string snap);
    /// Several at once: one drain, one switch, all or nothing.
    Task<Status> group_snapshot(
        std::vector<std::pair<std::shared_ptr<Export>, std::string>> targets);
    /// Drops the top layer (NAME.raw must be closed).
    Task<Status> revert(std::shared_ptr<Export> e);
    /// Starts an active commit of every layer above `base_file` (default: the layer below the
    /// top) into it.
    Task<Status> start_commit(std::shared_ptr<Export> e, std::string base_file);
    /// Starts pulling all backing data into the top layer.
    Task<Status> start_stream(std::shared_ptr<Export> e);
    /// cancel | pause | resume | speed BYTES_PER_S
    Status control(Export* e, const std::string& command);

    /// The running or last job of `e` as JSON, or "" if there was none.
    [[nodiscard]] std::string job_json(const Export* e) const;
    /// Every job, one JSON object per line.
    [[nodiscard]] std::string jobs_jsonl() const;
    [[nodiscard]] bool running(const Export* e) const;

    /// Cancels running jobs and waits for them (shutdown).
    Task<void> shutdown();
    /// Waits until `e` has no running job (tests).
    Task<void> wait(std::shared_ptr<Export> e);

    [[nodiscard]] ImageSet* images() const { return images_; }
    [[nodiscard]] Logger* log() const { return log_; }

  private:
    /// Why `e` cannot take a graph change now (a job holds it, it is failed, the mount is
    /// read-only), or nothing. The caller holds e->ops.
    Status refuse_if_busy(const Export* e) const;
    /// The last step before an operation changes anything, under the lock and after its own
    /// checks (refuse_if_busy first): this host becomes the image's writer, and the store
    /// still holds the chain that is served. True if it took the claim (see give_back).
    Task<Result<bool>> claim_and_verify(std::shared_ptr<Export> e);
    /// For a command refused after claim_and_verify took the claim (`fresh`): gives it back,
    /// so that a refused command leaves the lock with whoever had it. Failing to is logged.
    Task<void> give_back(std::shared_ptr<Export> e, bool fresh);
    /// EBUSY while the chain serves a layer under its hidden name (an edit left unfinished).
    static Status refuse_unfinished_edit(const Export* e);
    Job* record(std::shared_ptr<Job> job);
    Task<void> run_job(std::shared_ptr<Job> job, std::shared_ptr<Export> e);
    Task<Status> revert_locked(std::shared_ptr<Export> e);
    Task<Status> start_commit_locked(std::shared_ptr<Export> e, std::string base_file);

    ImageSet* images_;
    Logger* log_;
    TaskScope scope_;
    WaitQueue finished_;
    std::vector<std::shared_ptr<Job>> jobs_;
    uint64_t next_id_ = 1;
};

/// Snapshot names: [A-Za-z0-9][A-Za-z0-9._-]{0,63}.
bool valid_snapshot_name(std::string_view name);

/// A job that already happened (snapshot, revert): concluded at once, kept for status.
class RecordJob final : public Job {
  public:
    RecordJob(EventLoop* loop, uint64_t id, std::string type, std::shared_ptr<Export> e,
              uint64_t bytes);
    Task<Status> body() override { co_return Status{}; }
};

}  // namespace imgfs
