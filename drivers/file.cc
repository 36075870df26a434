#include "drivers/file.h"

#include <algorithm>
#include <cstring>
#include <fcntl.h>
#include <unistd.h>

#include <linux/falloc.h>
#include <linux/magic.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>

#include "core/event_loop.h"
#include "core/log.h"

namespace imgfs {

Result<std::shared_ptr<FileNode>> FileNode::open(NodeEnv env, std::string name, int dir_fd,
                                                 const std::string& path, FileOptions options) {
    int flags = O_CLOEXEC | (options.read_only ? O_RDONLY : O_RDWR);
    if (options.direct) {
        flags |= O_DIRECT;
    }
    int fd = ::openat(dir_fd, path.c_str(), flags);
    if (fd < 0) {
        int err = errno;
        if (err == EINVAL && options.direct) {
            return make_error(err, "{}: the filesystem does not support O_DIRECT", path);
        }
        return make_error(err, "cannot open {}", path);
    }
    return from_fd(env, std::move(name), UniqueFd(fd), options);
}

Result<std::shared_ptr<FileNode>> FileNode::from_fd(NodeEnv env, std::string name, UniqueFd fd,
                                                    FileOptions options) {
    auto node = std::make_shared<FileNode>(env, std::move(name), std::move(fd), options);
    TRY(node->init());
    return node;
}

FileNode::FileNode(NodeEnv env, std::string name, UniqueFd fd, FileOptions options)
    : Node(env, std::move(name)), fd_(std::move(fd)), options_(options), flush_mutex_(env.loop) {}

Status FileNode::init() {
    struct statx stx {};
    const unsigned mask = STATX_SIZE | STATX_TYPE | STATX_DIOALIGN;
    if (::statx(fd_.get(), "", AT_EMPTY_PATH, mask, &stx) != 0) {
        return make_error(errno, "{}: statx", name());
    }
    if (!S_ISREG(stx.stx_mode) && !S_ISBLK(stx.stx_mode)) {
        return make_error(EINVAL, "{}: not a regular file or block device", name());
    }
    size_ = stx.stx_size;
    if (S_ISBLK(stx.stx_mode)) {
        off_t end = ::lseek(fd_.get(), 0, SEEK_END);
        if (end < 0) {
            return make_error(errno, "{}: cannot find the device size", name());
        }
        size_ = static_cast<uint64_t>(end);
    }
    zeros_from_ = size_;
    read_only_ = options_.read_only;
    if (options_.direct) {
        // A descriptor handed over (a snapshot's new overlay, made by the store) may have been
        // opened without it: the limits below would then promise what the I/O does not do.
        const int flags = ::fcntl(fd_.get(), F_GETFL);
        if (flags < 0 ||
            ((flags & O_DIRECT) == 0 && ::fcntl(fd_.get(), F_SETFL, flags | O_DIRECT) != 0)) {
            return make_error(errno, "{}: cannot use O_DIRECT", name());
        }
    }
    if (struct statfs fs{};
        !options_.direct && S_ISREG(stx.stx_mode) && ::fstatfs(fd_.get(), &fs) == 0) {
        // Where io_uring hands the I/O to a worker thread (see may_go_inline).
        writes_inline_ = fs.f_type == EXT4_SUPER_MAGIC || fs.f_type == TMPFS_MAGIC;
        reads_inline_ = fs.f_type == TMPFS_MAGIC;
    }
    if (!options_.direct && S_ISREG(stx.stx_mode)) {
        // What reads that miss the page cache need to go direct (see do_read); zero (tmpfs,
        // older kernels): they stay buffered. The descriptor is opened on the first such read.
        if ((stx.stx_mask & STATX_DIOALIGN) != 0 && stx.stx_dio_offset_align != 0) {
            direct_offset_align_ = stx.stx_dio_offset_align;
            direct_memory_align_ = std::max<uint32_t>(stx.stx_dio_mem_align, 1);
        }
    }
    limits_ = Limits{};
    limits_.max_transfer = 16ULL << 20;
    if (options_.direct) {
        uint32_t offset_align = 4096;
        uint32_t mem_align = 4096;
        if ((stx.stx_mask & STATX_DIOALIGN) != 0 && stx.stx_dio_offset_align != 0) {
            offset_align = stx.stx_dio_offset_align;
            mem_align = std::max<uint32_t>(stx.stx_dio_mem_align, 1);
        }
        limits_.request_alignment = offset_align;
        limits_.memory_alignment = mem_align;
    }
    caps_.write_zeroes = true;
    caps_.discard = true;
    caps_.block_status = S_ISREG(stx.stx_mode);
    caps_.resize = S_ISREG(stx.stx_mode);
    return {};
}

Error FileNode::io_error(int errnum, const char* op, uint64_t offset, uint64_t bytes) const {
    return make_error(errnum, "{}: {} of {} bytes at {}", name(), op, bytes, offset);
}

// Reads. A read of what the page cache holds is served from it; any other goes to the disk
// with O_DIRECT through a second descriptor, unless several images read this layer (a shared
// base), whose blocks the host's cache keeps once for all of them. Why: a cold 4 KiB read
// through the cache read 7.9 KiB from the disk and cost twice the CPU of a direct one
// (docs/benchmarks.md, 2026-12-06), and what it would cache for one image the cache above us
// holds already (the filesystem on a loop device, a guest's own), so the host would keep each
// block twice. Writes stay buffered, so what was just written is read back from the cache,
// and so is everything on tmpfs. A direct read is coherent with buffered writes: the kernel
// writes the range's dirty pages back before it reads.
Task<Status> FileNode::do_read(uint64_t offset, MutBuf buf) {
    size_t done = 0;
    if (read_direct(offset, buf)) {
        int attempts = 0;
        int32_t res = 0;
        do {
            res = co_await env_.loop->read_some(direct_fd_.get(), buf, offset);
        } while (res < 0 && co_await env_.loop->retry_transient(res, &attempts, true));
        if (res == -EINVAL) {
            // An alignment statx did not announce: buffered from now on. The descriptor
            // stays open until the node goes: another read may have a request on it queued,
            // and a closed number could be reused by another file's open before it is sent.
            direct_offset_align_ = 0;
        } else if (res >= 0) {
            ++direct_reads_;
            done = static_cast<size_t>(res);
        }
        // Any other error: the buffered read below answers. It may still succeed (the
        // write-back of the range's dirty pages that a direct read starts failed: the
        // cache holds the data, and the next flush reports the loss).
    }
    // The rest (all of a buffered read; after a direct read, nothing or what lies at EOF).
    if (done < buf.size()) {
        Status failed;
        size_t got = 0;
        const bool whole = try_read_inline(offset + done, buf.subspan(done), &got, &failed);
        CO_TRY(std::move(failed));
        done += got;
        if (!whole) {
            CO_TRY_ASSIGN(size_t n, co_await env_.loop->read_full(fd_.get(), buf.subspan(done),
                                                                  offset + done));
            done += n;
        }
    }
    if (done < buf.size()) {
        // Past EOF (the file may end inside the last aligned block): zeros.
        std::memset(buf.data() + done, 0, buf.size() - done);
    }
    co_return Status{};
}

namespace {
// Whether a failure to start writeback may have cost the pages it was given; the others (no
// such call, no memory for it now) leave them dirty for the next fdatasync.
bool writeback_lost_data(int errnum) {
    return errnum != EINVAL && errnum != ESPIPE && errnum != ENOSYS && errnum != EOPNOTSUPP &&
           errnum != EAGAIN && errnum != ENOMEM && errnum != EINTR;
}

// cachestat(2), Linux 6.5; Debian 12's headers predate it. Added after the syscall tables
// were unified, so its number is the same on every architecture.
constexpr long kSysCachestat = 451;
struct CachestatRange {
    uint64_t off;
    uint64_t len;
};
struct Cachestat {
    uint64_t nr_cache;
    uint64_t nr_dirty;
    uint64_t nr_writeback;
    uint64_t nr_evicted;
    uint64_t nr_recently_evicted;
};

// Whether more than one image reads through `node`: it, or a node above it, is the backing
// layer of two or more others. Edges from backends and jobs do not count.
bool read_by_several_images(const Node* node) {
    for (int depth = 0; node != nullptr && depth < 1024; ++depth) {  // the graph has no cycles
        const Node* above = nullptr;
        int backing_of = 0;
        for (const Child* edge : node->parents()) {
            backing_of += edge->role() == ChildRole::kBacking ? 1 : 0;
            if (!edge->user_edge() && edge->owner()->as_node() != nullptr) {
                above = edge->owner()->as_node();
            }
        }
        if (backing_of > 1) {
            return true;
        }
        node = above;
    }
    return false;
}

}  // namespace

bool FileNode::read_direct(uint64_t offset, MutBuf buf) {
    const auto address = reinterpret_cast<uintptr_t>(buf.data());
    if (direct_offset_align_ == 0 || !cachestat_supported_ || failed_ ||
        offset % direct_offset_align_ != 0 || buf.size() % direct_offset_align_ != 0 ||
        address % direct_memory_align_ != 0 || read_by_several_images(this)) {
        // After a failed fdatasync the cache may hold written data the disk never got:
        // reads keep showing what was written, as they did before the failure.
        return false;
    }
    // Asking the cache first, rather than trying a buffered read with RWF_NOWAIT: on ext4 such
    // a read that misses returns EAGAIN but starts the read-ahead anyway (measured: two disk
    // reads per 4 KiB request). cachestat walks the cache's index and does no I/O.
    static const auto page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
    CachestatRange range{offset, buf.size()};
    Cachestat stat{};
    if (::syscall(kSysCachestat, fd_.get(), &range, &stat, 0) != 0) {
        // Kernels before 6.5, or one that refuses it on a file we may not write (stable
        // kernels since 2025 ask for write permission): every read buffered, as before.
        cachestat_supported_ = false;
        return false;
    }
    const uint64_t pages = (offset + buf.size() + page - 1) / page - offset / page;
    return stat.nr_cache < pages && direct_fd().valid();
}

const UniqueFd& FileNode::direct_fd() {
    if (direct_fd_.valid() || direct_offset_align_ == 0) {
        return direct_fd_;
    }
    // A new open of the same file (through its /proc link, so it works for a file without a
    // name and needs no directory): O_DIRECT is a property of the open file, and fd_ keeps
    // the page cache for writes. Any failure (no /proc, no descriptors left) leaves reads
    // buffered, as they were.
    const std::string link = "/proc/self/fd/" + std::to_string(fd_.get());
    direct_fd_ = UniqueFd(::open(link.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC));
    if (!direct_fd_.valid()) {
        direct_offset_align_ = 0;
    }
    return direct_fd_;
}

Task<Status> FileNode::do_write(uint64_t offset, ConstBuf buf) {
    if (failed_) {
        co_return make_error(EIO,
                             "{}: an earlier flush failed; writes are refused until the "
                             "image is reopened",
                             name());
    }
    // Raised before the write is issued: a write that fails part way (ENOSPC after a short
    // write) still leaves its first bytes in the file, past the size we know of.
    zeros_from_ = std::max(zeros_from_, offset + buf.size());
    Status st;
    size_t inline_done = 0;
    if (!try_write_inline(offset, buf, &inline_done, &st)) {
        st = co_await env_.loop->write_full(fd_.get(), buf.subspan(inline_done),
                                            offset + inline_done);
    }
    if (!st) {
        co_return io_error(st.error().errnum, "write", offset, buf.size());
    }
    size_ = std::max<uint64_t>(size_, offset + buf.size());
    if (!options_.direct && buf.size() >= kWriteBehindMin && in_flight() == 1) {
        // Write-behind: a client that writes large pieces one at a time (a guest's 1 MiB
        // writes, a copy into a loop-mounted file system) ends with an fsync, which would
        // otherwise write all of it at once, after the last write: the kernel leaves dirty
        // pages alone until a tenth of the memory is dirty. Starting each such write's
        // writeback now puts the idle disk to work while the client sends the next one. Not
        // for a write with others in flight beside it: a deep queue of buffered writes runs at
        // the speed of memory, and writing it back as it comes held it to the disk's (1M
        // writes at depth 8: 2,108-2,408 MiB/s against 3,274-3,330). Small writes are left
        // to the kernel: the qcow2 metadata this file holds is rewritten often. Advisory, but
        // an I/O or space error fails the write: the file system may have dropped the pages it
        // could not write (ext4's failed delayed allocation does), and no later fdatasync
        // would say so. An error of the writeback itself waits for the next fdatasync.
        Status started = co_await env_.loop->start_writeback(fd_.get(), offset, buf.size());
        if (!started && writeback_lost_data(started.error().errnum)) {
            co_return io_error(started.error().errnum, "write-behind", offset, buf.size());
        }
    }
    co_return Status{};
}

namespace {
constexpr size_t kInlineMax = 64 * 1024;  // a copy of this takes a few microseconds
}  // namespace

// Inline I/O: a pread(2) or pwrite(2) on the loop's thread instead of an io_uring SQE, for I/O
// that io_uring would hand to one of its worker threads and wake us when done. That is every
// buffered write on ext4 (it has no non-blocking buffered write: RWF_NOWAIT gives EOPNOTSUPP)
// and tmpfs, and every read of a file on tmpfs. At 4 KiB QD32 that hop was a third of the
// daemon's CPU samples and cost a sixth of the write IOPS (docs/benchmarks.md, 2026-12-07).
// Other filesystems (XFS, btrfs) take non-blocking buffered writes, so io_uring makes those
// without a worker already: their I/O stays on the ring. Such I/O is a copy to or from the page
// cache, a few microseconds, unless the kernel makes it wait (dirty-page throttling, the
// journal, a lock, a partial page read from the disk), and then the whole loop waits: once such
// sleeps pass inline_sleep_budget_us in a second, inline I/O is off on the loop for a while
// (InlineGate, which also bounds the calls per turn of the loop). Never with O_DIRECT,
// which waits for the disk, and never above kInlineMax bytes.
bool FileNode::may_go_inline(size_t bytes) {
    return !options_.direct && bytes <= kInlineMax &&
           env_.loop->inline_gate().may_go(std::chrono::steady_clock::now());
}

FileNode::InlineClock FileNode::inline_start() {
    InlineClock c;
    c.start = std::chrono::steady_clock::now();
    // Voluntary context switches tell that the call slept in the kernel (throttled, or
    // waiting for a lock, the journal or the disk). Time alone would also count the thread's
    // preemption, which is not the call's doing and happens wherever the loop runs (1-3 ms
    // now and then, measured while fio shared the CPUs).
    struct rusage usage {};
    ::getrusage(RUSAGE_THREAD, &usage);
    c.voluntary_switches = usage.ru_nvcsw;
    return c;
}

void FileNode::inline_done(const InlineClock& clock, const char* op, size_t bytes) {
    ++inline_ops_;
    const auto end = std::chrono::steady_clock::now();
    struct rusage usage {};
    if (::getrusage(RUSAGE_THREAD, &usage) != 0 || usage.ru_nvcsw == clock.voluntary_switches) {
        return;  // it did not sleep
    }
    std::chrono::seconds cool_off{};
    if (!env_.loop->inline_gate().slept(end, end - clock.start,
                                        std::chrono::microseconds(options_.inline_sleep_budget_us),
                                        &cool_off)) {
        return;
    }
    ++inline_stalls_;
    env_.log->debug(
        "{}: a {} byte {} slept {} us in the kernel, past the budget for a second; "
        "I/O goes through io_uring for {} s",
        name(), bytes, op,
        std::chrono::duration_cast<std::chrono::microseconds>(end - clock.start).count(),
        cool_off.count());
}

namespace {

enum class InlineEnd { kDone, kEof, kFailed, kHandOver };

// Calls `io(done)` (one pread or pwrite of the rest, from `*done` of `bytes`) until it has all,
// the file ends (0 bytes), or it fails (errno in `*err`). EAGAIN and ENOMEM hand the rest to the
// ring, whose calls retry both (ENOMEM after a pause).
template <typename Io>
InlineEnd inline_loop(size_t bytes, size_t* done, int* err, Io io) {
    while (*done < bytes) {
        const ssize_t n = io(*done);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            *err = errno;
            return errno == EAGAIN || errno == ENOMEM ? InlineEnd::kHandOver : InlineEnd::kFailed;
        }
        if (n == 0) {
            return InlineEnd::kEof;
        }
        *done += static_cast<size_t>(n);
    }
    return InlineEnd::kDone;
}

}  // namespace

bool FileNode::try_write_inline(uint64_t offset, ConstBuf buf, size_t* done, Status* st) {
    if (!writes_inline_ || !may_go_inline(buf.size())) {
        return false;
    }
    const InlineClock clock = inline_start();
    int err = 0;
    const InlineEnd end = inline_loop(buf.size(), done, &err, [&](size_t at) {
        return ::pwrite(fd_.get(), buf.data() + at, buf.size() - at,
                        static_cast<off_t>(offset + at));
    });
    inline_done(clock, "write", buf.size());
    if (end == InlineEnd::kFailed) {
        *st = Error{err, {}};
    } else if (end == InlineEnd::kEof) {
        *st = Error{EIO, "write made no progress"};
    }
    return end != InlineEnd::kHandOver;
}

bool FileNode::try_read_inline(uint64_t offset, MutBuf buf, size_t* done, Status* st) {
    if (!reads_inline_ || !may_go_inline(buf.size())) {
        return false;
    }
    const InlineClock clock = inline_start();
    int err = 0;
    const InlineEnd end = inline_loop(buf.size(), done, &err, [&](size_t at) {
        return ::pread(fd_.get(), buf.data() + at, buf.size() - at,
                       static_cast<off_t>(offset + at));
    });
    inline_done(clock, "read", buf.size());
    if (end == InlineEnd::kFailed) {
        *st = io_error(err, "read", offset, buf.size());
    }
    return end != InlineEnd::kHandOver;  // at kEof the caller fills zeros
}

// For a range that reads as zeros already: moves the end of the file to cover it and, with
// `allocate`, allocates it. The file never shrinks here. ftruncate would be wrong for growing
// it: `size_` learns of a write only when it completes, so a write past the range that the
// kernel finished but we have not reaped yet would be cut off.
Task<Status> FileNode::grow_zeroed(uint64_t offset, uint64_t bytes, bool allocate) {
    const uint64_t end = offset + bytes;
    if (!allocate && end <= size_) {
        co_return Status{};
    }
    // Without `allocate` only the last block is needed to move the end.
    const uint64_t last_block = std::max<uint64_t>(limits_.request_alignment, 4096);
    const uint64_t from = allocate ? offset : end - std::min(bytes, last_block);
    if (allocate_supported_) {
        // Mode 0 allocates (holes become allocated zeros) and extends, never shrinks.
        Status st = co_await env_.loop->fallocate(fd_.get(), 0, from, end - from);
        if (st) {
            size_ = std::max(size_, end);
            co_return Status{};
        }
        if (st.error().errnum != EOPNOTSUPP && st.error().errnum != ENOSYS) {
            co_return io_error(st.error().errnum, "allocate", from, end - from);
        }
        allocate_supported_ = false;
    }
    // Zeros written inside the caller's own range are safe whatever else is in flight.
    co_return co_await write_zero_buffers(from, end - from, ZeroPath::kDriver);
}

Task<Status> FileNode::do_write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap) {
    if (failed_) {
        co_return make_error(EIO, "{}: an earlier flush failed", name());
    }
    if (offset >= zeros_from_) {
        // Nothing was ever written here: the range reads as zeros already.
        co_return co_await grow_zeroed(offset, bytes, !may_unmap);
    }
    if (!may_unmap && zero_range_supported_) {
        // Zeroes in place, allocated; extends the size like a write (never shrinks it).
        Status st = co_await env_.loop->fallocate(fd_.get(), FALLOC_FL_ZERO_RANGE, offset, bytes);
        if (st) {
            size_ = std::max(size_, offset + bytes);
            co_return Status{};
        }
        if (st.error().errnum != EOPNOTSUPP && st.error().errnum != ENOSYS &&
            st.error().errnum != EINVAL) {
            co_return io_error(st.error().errnum, "zero range", offset, bytes);
        }
        zero_range_supported_ = false;
    }
    if (punch_supported_) {
        Status st = co_await env_.loop->fallocate(
            fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, bytes);
        if (st) {
            co_return co_await grow_zeroed(offset, bytes, !may_unmap);
        }
        if (st.error().errnum != EOPNOTSUPP && st.error().errnum != ENOSYS) {
            co_return io_error(st.error().errnum, "punch hole", offset, bytes);
        }
        punch_supported_ = false;
    }
    co_return co_await write_zero_buffers(offset, bytes, ZeroPath::kDriver);
}

Task<Status> FileNode::do_discard(uint64_t offset, uint64_t bytes) {
    if (!punch_supported_) {
        co_return Status{};
    }
    Status st = co_await env_.loop->fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                              offset, bytes);
    if (!st) {
        if (st.error().errnum == EOPNOTSUPP || st.error().errnum == ENOSYS) {
            punch_supported_ = false;  // discard is advisory
            co_return Status{};
        }
        co_return io_error(st.error().errnum, "discard", offset, bytes);
    }
    co_return Status{};
}

Task<Status> FileNode::do_flush() {
    if (read_only_ && !failed_) {
        co_return Status{};
    }
    // Covered by any fdatasync that starts from now on, including one another flush starts
    // while this one waits for the mutex.
    const uint64_t covered_by = fdatasyncs_ + 1;
    CoMutex::Guard guard = co_await flush_mutex_.lock();
    if (failed_) {
        co_return make_error(EIO, "{}: an earlier flush failed; the image must be reopened",
                             name());
    }
    if (fdatasyncs_done_ >= covered_by) {
        co_return Status{};
    }
    const uint64_t number = ++fdatasyncs_;
    Status st = co_await env_.loop->fsync(fd_.get(), true);
    const uint64_t nth = options_.fail_fdatasync_nth;
    if (st && options_.fail_fdatasync_errno != 0 &&
        (options_.fail_fdatasync_once ? number == nth : number >= nth)) {
        st = make_error(options_.fail_fdatasync_errno, "injected by rule");
    }
    if (!st) {
        failed_ = true;
        failed_reason_ = fmt::format(
            "fdatasync of {} failed ({}); writes are refused until the "
            "image is reopened",
            name(), st.error().message());
        if (env_.log != nullptr) {
            env_.log->error("{}: fdatasync failed ({}); refusing further writes until reopened",
                            name(), st.error().message());
        }
        co_return make_error(st.error().errnum, "{}: fdatasync", name());
    }
    fdatasyncs_done_ = number;
    co_return Status{};
}

Task<Result<BlockStatus>> FileNode::do_block_status(uint64_t offset, uint64_t bytes) {
    // lseek on a regular file does not block on I/O, so it is called directly.
    off_t data = ::lseek(fd_.get(), static_cast<off_t>(offset), SEEK_DATA);
    if (data < 0) {
        if (errno == ENXIO) {
            co_return BlockStatus{Alloc::kZero, bytes};  // only a hole up to EOF
        }
        co_return BlockStatus{Alloc::kData, bytes};  // no information: say data
    }
    if (static_cast<uint64_t>(data) > offset) {
        co_return BlockStatus{Alloc::kZero,
                              std::min<uint64_t>(bytes, static_cast<uint64_t>(data) - offset)};
    }
    off_t hole = ::lseek(fd_.get(), static_cast<off_t>(offset), SEEK_HOLE);
    if (hole < 0 || static_cast<uint64_t>(hole) <= offset) {
        co_return BlockStatus{Alloc::kData, bytes};
    }
    co_return BlockStatus{Alloc::kData,
                          std::min<uint64_t>(bytes, static_cast<uint64_t>(hole) - offset)};
}

Task<Status> FileNode::do_truncate(uint64_t new_size) {
    if (::ftruncate(fd_.get(), static_cast<off_t>(new_size)) != 0) {
        co_return make_error(errno, "{}: truncate to {}", name(), new_size);
    }
    size_ = new_size;
    co_return Status{};
}

Task<Result<uint64_t>> FileNode::allocated_bytes() {
    struct stat st {};
    if (::fstat(fd_.get(), &st) != 0) {
        co_return make_error(errno, "{}: fstat", name());
    }
    co_return static_cast<uint64_t>(st.st_blocks) * 512;
}

namespace {

// QEMU's image locking, byte for byte: permission bit i (the same values as ours) is "used" while
// byte kLockPermBase + i carries a shared lock and "not shared" while kLockSharedBase + i does.
constexpr off_t kLockPermBase = 100;
constexpr off_t kLockSharedBase = 200;
constexpr int kLockedPerms = 4;

bool lock_byte(int fd, off_t offset, bool lock) {
    struct flock fl {};
    fl.l_type = lock ? F_RDLCK : F_UNLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = offset;
    fl.l_len = 1;
    return ::fcntl(fd, F_OFD_SETLK, &fl) == 0;
}

// True if another open file (another process, or another open of ours) holds a lock there.
bool locked_elsewhere(int fd, off_t offset) {
    struct flock fl {};
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = offset;
    fl.l_len = 1;
    return ::fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type != F_UNLCK;
}

}  // namespace

// The locks belong to the open file description, which the kernel keeps until its last
// reference goes: an io_uring request whose completion we have already reaped can still hold
// one for a moment (the worker drops it after posting the completion), so after close() the
// image could still look "in use" to the next open, ours or QEMU's. Unlocking explicitly
// releases the locks when the node goes, however long the description lives on.
FileNode::~FileNode() {
    if (options_.locking && fd_.valid()) {
        struct flock fl {};
        fl.l_type = F_UNLCK;
        fl.l_whence = SEEK_SET;
        fl.l_start = kLockPermBase;
        fl.l_len = kLockSharedBase + kLockedPerms - kLockPermBase;
        if (::fcntl(fd_.get(), F_OFD_SETLK, &fl) != 0 && env().log != nullptr) {
            env().log->warn("{}: releasing its image locks: {}", name(), strerror(errno));
        }
    }
}

Status FileNode::check_perm(Perms perm, Perms shared) const {
    if (options_.read_only &&
        (perm & (perm::kWrite | perm::kWriteUnchanged | perm::kResize)) != 0) {
        return make_error(EROFS, "{} was opened read-only but {} is needed", name(),
                          perms_to_string(perm));
    }
    if (options_.locking) {
        for (int i = 0; i < kLockedPerms; ++i) {
            Perms bit = Perms{1} << i;
            if ((perm & bit) != 0 && locked_elsewhere(fd_.get(), kLockSharedBase + i)) {
                return make_error(EBUSY,
                                  "{} is in use by another process (QEMU?) that does not allow {}",
                                  name(), perms_to_string(bit));
            }
            if ((shared & bit) == 0 && locked_elsewhere(fd_.get(), kLockPermBase + i)) {
                return make_error(EBUSY, "{} is in use by another process (QEMU?) for {}", name(),
                                  perms_to_string(bit));
            }
        }
    }
    return Node::check_perm(perm, shared);
}

void FileNode::set_perm(Perms perm, Perms shared) {
    if (!options_.locking) {
        return;
    }
    for (int i = 0; i < kLockedPerms; ++i) {
        Perms bit = Perms{1} << i;
        // Failing to take a lock after check_perm passed means someone raced us; the next
        // refresh reports it. Nothing here can fail the transaction any more.
        (void)lock_byte(fd_.get(), kLockPermBase + i, (perm & bit) != 0);
        (void)lock_byte(fd_.get(), kLockSharedBase + i, (shared & bit) == 0);
    }
}

}  // namespace imgfs
