// ExportFs: the mount point's filesystem (docs/design.md §3): NAME.raw per exported chain and
// the .control tree. It turns FUSE requests into block-backend calls and control commands.
//
// Request lifetimes: a request holds its Export (and its open-file handle) by shared_ptr across
// every co_await, so a rescan may drop the export meanwhile without freeing what the request
// uses; every data and block-status access goes through the export's BlockBackend, so drained
// sections see it. Nothing else is kept across a co_await: containers (handles_, blocks_) are
// looked up again afterwards.
//
// Inode numbers are fixed for the lifetime of the mount: the root, .control and its global files
// have small constants; an export with id E has the block [kExportBase + E*16, +16).
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "core/wait_queue.h"
#include "fuse/control.h"
#include "fuse/fuse_server.h"
#include "fuse/read_ahead.h"
#include "jobs/image_set.h"

namespace imgfs {

struct ExportFsOptions {
    bool read_only = false;
    bool allow_other = false;
    uint32_t uid = 0;
    uint32_t gid = 0;
    /// How old an allocation count (st_blocks of NAME.raw) may be before it is counted again.
    std::chrono::milliseconds blocks_refresh{3000};
    /// How long the store's room (STATFS) is answered from the last figure.
    std::chrono::milliseconds statfs_refresh{1000};
};

class ExportFs final : public FuseHandler {
  public:
    ExportFs(ImageSet* images, ControlPlane* control, Logger* log, ExportFsOptions options);
    ExportFs(const ExportFs&) = delete;
    ExportFs& operator=(const ExportFs&) = delete;
    ~ExportFs() override;

    Task<FuseReply> handle(FuseRequest* req) override;
    /// Waits for the reads ahead still in flight (the server's end, before the images close).
    Task<void> finish() override;
    /// Reads ahead of in-order readers (exposed for tests).
    [[nodiscard]] const ReadAhead& read_ahead() const { return read_ahead_; }
    FuseReply oversized(uint32_t opcode) override;
    [[nodiscard]] FuseReply refused_whatever_the_arguments(uint32_t opcode) const;

    // Inode layout (exposed for tests).
    static constexpr uint64_t kRootIno = 1;
    static constexpr uint64_t kControlDirIno = 2;
    static constexpr uint64_t kExportBase = 1024;
    static uint64_t raw_ino(const Export& e) { return kExportBase + e.id * 16; }
    /// How many exports have an allocation figure kept (exposed for tests).
    [[nodiscard]] size_t allocation_figures() const { return blocks_.size(); }

  private:
    struct Handle;
    struct Resolved;
    Resolved resolve(uint64_t ino) const;
    bool fill_attr(uint64_t ino, fuse_attr* attr);
    std::shared_ptr<Handle> find_handle(uint64_t fh) const;
    /// The errno for a request on inode `ino`, which does not resolve.
    static int gone_errno(uint64_t ino);
    /// The guest-visible allocation of `e` changed: the next getattr counts it again.
    void invalidate_blocks(uint64_t export_id);
    /// Drops the allocation figures of exports that are gone, once they outnumber the live ones.
    void forget_gone_exports();
    /// NAME.raw of `export_id` changed now: its mtime and ctime move on.
    void touch(uint64_t export_id);
    /// A setattr's atime and mtime (given, or now) for NAME.raw of `export_id`.
    void set_times(uint64_t export_id, const fuse_setattr_in& in);

    Task<FuseReply> lookup(FuseRequest* req);
    Task<FuseReply> getattr(FuseRequest* req);
    Task<FuseReply> setattr(FuseRequest* req);
    Task<FuseReply> open(FuseRequest* req);
    Task<FuseReply> release(FuseRequest* req);
    Task<FuseReply> read(FuseRequest* req);
    Task<FuseReply> write(FuseRequest* req);
    /// Before the first write of an image this host may not yet write (a pool image: see
    /// ImageSet::claim_writes): claims it. Nothing to do otherwise.
    Task<Status> claim_for(std::shared_ptr<Export> e, std::string op);
    Task<FuseReply> flush(FuseRequest* req);
    Task<FuseReply> readdir(FuseRequest* req);
    Task<FuseReply> statfs(FuseRequest* req);
    static FuseReply statfs_reply(const Result<StoreSpace>& got);
    Task<FuseReply> fallocate(FuseRequest* req);
    Task<FuseReply> lseek(FuseRequest* req);
    Task<void> refresh_blocks(std::shared_ptr<Export> e);

    ImageSet* images_;
    ControlPlane* control_;
    Logger* log_;
    ExportFsOptions options_;
    std::map<uint64_t, std::shared_ptr<Handle>> handles_;
    uint64_t next_fh_ = 1;
    int64_t mount_time_s_;
    bool statfs_failing_ = false;  // the last STATFS could not ask the store
    // The store's room, asked once at a time and at most once per statfs_refresh: asking can
    // take up to the cluster's deadline, and every STATFS waiting for it held a request
    // buffer, so a crowd of `df` calls stopped every image's I/O.
    std::optional<Result<StoreSpace>> statfs_last_;
    std::chrono::steady_clock::time_point statfs_at_{};
    bool statfs_asking_ = false;
    WaitQueue statfs_waiters_;  // callers with no figure yet, waiting for the first query
    // Guest-visible allocation per export (st_blocks), refreshed at most every few seconds.
    // Without a figure (never counted, or invalidated) a GETATTR counts to the end; a stale
    // figure is recounted a few hundred runs per GETATTR, which answers with the old figure
    // until the walk is through, so that `stat` never waits for a walk of a large image.
    struct BlocksCache {
        uint64_t bytes = 0;
        std::chrono::steady_clock::time_point at{};
        bool valid = false;
        uint64_t generation = 0;  // bumped by every invalidation, so a count that raced one is
                                  // not stored
        bool counting = false;    // a walk is under way: others answer with the last figure
        // The walk so far (of `walk_generation`): where it goes on, and the data before that.
        uint64_t walk_offset = 0;
        uint64_t walk_data = 0;
        uint64_t walk_generation = UINT64_MAX;
        std::chrono::steady_clock::time_point walk_start{};
    };
    std::map<uint64_t, BlocksCache> blocks_;
    // NAME.raw's times, by export id, once a write or a setattr changed them (until then, the
    // mount's time): a disk whose size never changes must still look changed to rsync and
    // to backups that go by mtime. Kept in memory only: a remount starts from its own time,
    // later than every write before it.
    struct RawTimes {
        timespec atime{};
        timespec mtime{};
        timespec ctime{};
    };
    std::map<uint64_t, RawTimes> times_;
    ReadAhead read_ahead_;
};

}  // namespace imgfs
