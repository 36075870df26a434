// CommitJob: active commit of every layer above chain.layers[base] into it, while NAME.raw stays
// writable. A MirrorFilter over the top records what the guest writes. The job copies every
// range some layer above the base holds (clearing its dirty bit before reading, so a guest write
// that lands meanwhile marks it again); once little is left it switches the filter to writing
// guest writes through to the base as well, so the dirty set only shrinks: the commit converges
// under a steady writer. With nothing dirty it is ready: drained, the base is flushed, the
// chain on disk is pointed past any middle layers, the export is switched to the base in one
// transaction, and the merged files are deleted. If a guest write failed to reach the base
// meanwhile (something is dirty again at the switch), the commit is abandoned instead.
#pragma once

#include <memory>
#include <vector>

#include "jobs/chain_edit.h"
#include "jobs/dirty_bitmap.h"
#include "jobs/image_set.h"
#include "jobs/job.h"
#include "jobs/mirror_filter.h"

namespace imgfs {

class CommitJob final : public Job {
  public:
    CommitJob(ImageSet* images, uint64_t id, std::shared_ptr<Export> e, size_t base_index,
              uint64_t estimate);
    ~CommitJob() override;
    Task<Status> body() override;

  protected:
    void release_nodes() override;
    /// Once the first scan is through: the ranges still dirty and those being copied.
    [[nodiscard]] std::optional<uint64_t> remaining_bytes() const override;

  private:
    // Steps that change the graph take the image's lock (attach, abandon, complete) or expect
    // it held.
    Task<Status> attach();
    Task<void> detach_after_failure();
    Task<void> abandon();
    Task<Status> complete();
    Task<Status> grow_base();
    Task<Status> copy_pass();
    Task<void> copy_worker(uint64_t* cursor, Status* result);
    /// Copies [offset, offset + bytes) to the base through `scratch` (at least `bytes` long).
    Task<Status> copy_range(uint64_t offset, uint64_t bytes, MutBuf scratch);
    Task<Result<bool>> pivot();
    [[nodiscard]] std::string pivot_failure() const;
    Task<void> finish();

    ImageSet* images_;
    size_t base_index_;
    std::shared_ptr<Node> top_;
    std::shared_ptr<Node> base_;
    std::shared_ptr<MirrorFilter> filter_;
    Child* target_ = nullptr;  // our edge to the base
    std::unique_ptr<DirtyBitmap> dirty_;
    bool scanned_ = false;                        // dirty_ holds all the work (remaining_bytes)
    uint64_t copying_bytes_ = 0;                  // cleaned in dirty_, not yet counted done
    DroppedTop dropped_top_ = DroppedTop::kKept;  // what pivot did with the top's file
    std::string fenced_why_;                      // set if pivot had to fence the image
    std::vector<FileId> changing_;                // the middle layers, marked in images_
};

}  // namespace imgfs
