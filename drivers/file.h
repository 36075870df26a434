// file: a POSIX file as a node. Data I/O goes through the event loop's io_uring, except what
// io_uring would hand to a worker thread (small buffered writes on ext4 and tmpfs; reads of
// files on tmpfs),
// made with pread/pwrite on the loop's thread (see may_go_inline); block status uses
// SEEK_DATA/SEEK_HOLE. With `direct` the file is opened O_DIRECT and the node's
// limits carry the device's alignment, so the generic layer pads requests to it. Without it,
// writes go through the page cache, and so do reads of what the cache holds; a read of what
// it does not hold goes to the disk with O_DIRECT (see do_read).
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "core/co_mutex.h"
#include "core/node.h"
#include "core/unique_fd.h"

namespace imgfs {

struct FileOptions {
    bool read_only = false;
    bool direct = false;
    /// The layer will be written (a chain's top): a store with cluster-wide write locks takes
    /// this file's (Store::open_from_loop).
    bool exclusive = false;
    /// Take QEMU's image locks (see set_perm), so a QEMU process and imgfs never both write.
    bool locking = true;
    /// Tests (mount option faults=): from the `fail_fdatasync_nth`th fdatasync on (only that
    /// one with `fail_fdatasync_once`, as the kernel reports a writeback error once), report
    /// `fail_fdatasync_errno` after it returns, so that the real failure path runs.
    /// How long I/O made on the loop's thread (see FileNode::may_go_inline) may sleep in the
    /// kernel within a second before such I/O stops on the loop for a while (InlineGate). A
    /// copy into the page cache takes a few microseconds; a partial page read from a disk, a
    /// journal wait or throttling take far longer. Tests set 0 to make every sleep a stall,
    /// and UINT32_MAX for none.
    uint32_t inline_sleep_budget_us = 1000;
    int fail_fdatasync_errno = 0;
    uint64_t fail_fdatasync_nth = 1;
    bool fail_fdatasync_once = false;
};

class FileNode final : public Node {
  public:
    /// Opens `path` relative to `dir_fd` (AT_FDCWD for the working directory).
    static Result<std::shared_ptr<FileNode>> open(NodeEnv env, std::string name, int dir_fd,
                                                  const std::string& path, FileOptions options);
    /// Takes over an open descriptor whose access mode matches `options`.
    static Result<std::shared_ptr<FileNode>> from_fd(NodeEnv env, std::string name, UniqueFd fd,
                                                     FileOptions options);

    FileNode(NodeEnv env, std::string name, UniqueFd fd, FileOptions options);
    /// Releases the image locks before the descriptor is closed (see file.cc).
    ~FileNode() override;

    /// A buffered write of at least this many bytes, alone in flight at the file, starts its
    /// own writeback (see do_write).
    static constexpr size_t kWriteBehindMin = 256 << 10;

    [[nodiscard]] const char* driver_name() const override { return "file"; }
    [[nodiscard]] int fd() const { return fd_.get(); }
    /// After a failed fdatasync the node refuses writes and flushes until it is reopened: the
    /// kernel may have dropped the dirty pages, so retrying would report success for lost data.
    [[nodiscard]] bool failed() const { return failed_; }
    [[nodiscard]] std::string refusing_writes() const override { return failed_reason_; }

    /// Reads that missed the page cache and went to the disk with O_DIRECT (see do_read).
    [[nodiscard]] uint64_t direct_reads() const { return direct_reads_; }
    /// Reads and writes of this file made on the loop's thread, and those that stalled it
    /// (may_go_inline).
    [[nodiscard]] uint64_t inline_ops() const { return inline_ops_; }
    [[nodiscard]] uint64_t inline_stalls() const { return inline_stalls_; }

    Task<Result<uint64_t>> allocated_bytes() override;
    [[nodiscard]] uint64_t zeros_from() const override { return zeros_from_; }
    /// Refuses permissions another process's image locks forbid (QEMU's protocol: a shared
    /// OFD lock on byte 100+i while permission i is used, on byte 200+i while it is not shared).
    Status check_perm(Perms perm, Perms shared) const override;
    /// Takes and releases those lock bytes to match.
    void set_perm(Perms perm, Perms shared) override;

  protected:
    Task<Status> do_read(uint64_t offset, MutBuf buf) override;
    Task<Status> do_write(uint64_t offset, ConstBuf buf) override;
    Task<Status> do_write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap) override;
    Task<Status> do_discard(uint64_t offset, uint64_t bytes) override;
    Task<Status> do_flush() override;
    Task<Result<BlockStatus>> do_block_status(uint64_t offset, uint64_t bytes) override;
    Task<Status> do_truncate(uint64_t new_size) override;

  private:
    Status init();
    /// The O_DIRECT descriptor for reads that miss the page cache, opened on first use;
    /// invalid if the file cannot be read that way (then every read is buffered).
    const UniqueFd& direct_fd();
    /// Whether a read of this range goes to the disk directly: it meets the O_DIRECT
    /// alignment, one image alone reads this layer, and the page cache lacks some of it.
    bool read_direct(uint64_t offset, MutBuf buf);
    /// Whether an I/O of `bytes` goes on the loop's thread rather than through the ring.
    bool may_go_inline(size_t bytes);
    struct InlineClock {
        std::chrono::steady_clock::time_point start;
        long voluntary_switches = 0;
    };
    InlineClock inline_start();
    /// Counts the inline I/O begun at `clock`, and judges whether it stalled the loop.
    void inline_done(const InlineClock& clock, const char* op, size_t bytes);
    /// Makes the write with pwrite(2) on the loop's thread if it may, its outcome in `st`;
    /// false if it goes through the ring, or its rest does (after `done` bytes, on EAGAIN or
    /// ENOMEM).
    bool try_write_inline(uint64_t offset, ConstBuf buf, size_t* done, Status* st);
    /// The same for a buffered read of a file on tmpfs, with pread(2); `done` short of the
    /// buffer (and true): the file ends there.
    bool try_read_inline(uint64_t offset, MutBuf buf, size_t* done, Status* st);
    Task<Status> grow_zeroed(uint64_t offset, uint64_t bytes, bool allocate);
    Error io_error(int errnum, const char* op, uint64_t offset, uint64_t bytes) const;

    UniqueFd fd_;
    FileOptions options_;
    bool failed_ = false;
    std::string failed_reason_;  // what refusing_writes() says once failed_
    // One fdatasync at a time: the kernel reports a writeback error to one of them only, so a
    // second one in flight could succeed for the data the first one's error says is lost.
    CoMutex flush_mutex_;
    uint64_t fdatasyncs_ = 0;       // started
    uint64_t fdatasyncs_done_ = 0;  // the number of the last one that succeeded
    bool punch_supported_ = true;
    bool zero_range_supported_ = true;
    bool allocate_supported_ = true;
    // Reads that miss the page cache (see do_read). direct_offset_align_ 0: they stay
    // buffered (no O_DIRECT here, or it failed). `cachestat_supported_`: the kernel says
    // what the cache holds.
    UniqueFd direct_fd_;
    bool cachestat_supported_ = true;
    uint32_t direct_offset_align_ = 0;
    uint32_t direct_memory_align_ = 0;
    uint64_t direct_reads_ = 0;
    // Inline I/O (see may_go_inline): writes on ext4 and tmpfs, reads on tmpfs; the bounds
    // are the loop's (InlineGate). The counters are this file's.
    bool writes_inline_ = false;
    bool reads_inline_ = false;
    uint64_t inline_ops_ = 0;
    uint64_t inline_stalls_ = 0;
    // No byte at or past this offset was ever written (see zeros_from()). Unlike size_, it
    // counts writes that are in flight or failed part way.
    uint64_t zeros_from_ = 0;
};

}  // namespace imgfs
