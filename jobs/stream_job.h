// StreamJob: copies into the top layer everything it shows from its backing chain, then makes it
// stand alone (no backing file) and deletes the layers of the same image that no chain uses any
// more. Guest writes keep going to the top throughout: a MirrorFilter tracks them, and each
// range is copied under a serialising request after checking again that the top still does not
// hold it, so a copy never overwrites what the guest just wrote.
#pragma once

#include <memory>

#include "jobs/image_set.h"
#include "jobs/job.h"
#include "jobs/mirror_filter.h"

namespace imgfs {

class StreamJob final : public Job {
  public:
    StreamJob(ImageSet* images, uint64_t id, std::shared_ptr<Export> e);
    ~StreamJob() override;
    Task<Status> body() override;

  protected:
    void release_nodes() override;

  private:
    // Steps that change the graph take the image's lock (abandon, complete) or expect it held.
    Task<Status> attach();
    Task<void> detach();
    Task<void> abandon();
    Task<Status> complete();
    Task<Result<uint64_t>> copy_chunk(uint64_t offset, uint64_t bytes);
    Task<Status> finish();
    /// How many of the image's own older layers (those below the top named after the image)
    /// the stream may delete: none that another chain uses, served here or not, and none
    /// below such a layer (that chain goes through them). Fails if a chain this mount does not
    /// serve cannot be read.
    Task<Result<size_t>> removable_own_layers();

    ImageSet* images_;
    std::shared_ptr<Node> top_;
    std::shared_ptr<MirrorFilter> filter_;
    Child* writer_ = nullptr;  // our edge to the top (write-unchanged)
};

}  // namespace imgfs
