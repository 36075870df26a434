#include "fuse/export_fs.h"

#include <algorithm>
#include <cassert>
#include <cstring>
#include <ctime>
#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>

#include <linux/falloc.h>

#include "core/chain_status.h"

namespace imgfs {

namespace {

constexpr uint64_t kGlobalFirstIno = 3;
constexpr uint64_t kRawSub = 0;
constexpr uint64_t kDirSub = 1;
constexpr uint64_t kFirstFileSub = 2;
// Runs of a recount one GETATTR walks; and how many runs a walk takes between visits to the
// kernel, so that the loop serves other requests while it walks cached metadata.
constexpr int kBlocksRunsPerStep = 512;
constexpr int kBlocksRunsPerYield = 64;

bool overflows(uint64_t a, uint64_t b) {
    uint64_t s = 0;
    return __builtin_add_overflow(a, b, &s);
}

template <typename T>
bool parse_arg(const FuseRequest* req, T* out) {
    if (req->arg.size() < sizeof(T)) {
        return false;
    }
    std::memcpy(out, req->arg.data(), sizeof(T));
    return true;
}

// A name argument (LOOKUP): NUL terminated after any struct.
std::string_view name_arg(const FuseRequest* req, size_t skip) {
    if (req->arg.size() <= skip) {
        return {};
    }
    const char* p = reinterpret_cast<const char*>(req->arg.data() + skip);
    return std::string_view(p, strnlen(p, req->arg.size() - skip));
}

// Appends one directory record (a plain function: fuse_dirent ends in a flexible array, which a
// coroutine frame cannot hold).
void append_dirent(std::vector<uint8_t>* out, uint64_t ino, uint64_t next, uint32_t type,
                   const std::string& name) {
    size_t pos = out->size();
    out->resize(pos + FUSE_DIRENT_ALIGN(FUSE_NAME_OFFSET + name.size()), 0);
    fuse_dirent d{};
    d.ino = ino;
    d.off = next;
    d.namelen = static_cast<uint32_t>(name.size());
    d.type = type;
    std::memcpy(out->data() + pos, &d, FUSE_NAME_OFFSET);
    std::memcpy(out->data() + pos + FUSE_NAME_OFFSET, name.data(), name.size());
}

}  // namespace

// A disk is a whole number of sectors: qcow2 stores no other size (QEMU rounds one down, and a
// snapshot of such an image could not be created), so NAME.raw only grows by whole sectors.
constexpr uint64_t kSectorBytes = 512;

struct ExportFs::Handle {
    uint64_t ino = 0;
    std::shared_ptr<Export> e;  // null for global files
    bool raw = false;
    bool writing = false;  // opened for writing
    // A control write was refused as too long: what follows on this handle is the rest of
    // that line (stdio writes a long line in pieces), not a command of its own.
    bool split_line = false;
    ControlFile file = ControlFile::kInfo;
    std::string content;
};

struct ExportFs::Resolved {
    enum class Kind {
        kNone,
        kRootDir,
        kControlDir,
        kImageDir,
        kRaw,
        kControlFile
    } kind = Kind::kNone;
    std::shared_ptr<Export> e;
    const ControlFileSpec* spec = nullptr;
};

ExportFs::ExportFs(ImageSet* images, ControlPlane* control, Logger* log, ExportFsOptions options)
    : images_(images),
      control_(control),
      log_(log),
      options_(options),
      mount_time_s_(static_cast<int64_t>(::time(nullptr))),
      statfs_waiters_(images->env().loop),
      read_ahead_(images->env().loop,
                  ReadAheadOptions{.enabled = !images->store()->caps().shared_between_hosts}) {}

ExportFs::~ExportFs() = default;

Task<void> ExportFs::finish() {
    co_await read_ahead_.join();
}

int ExportFs::gone_errno(uint64_t ino) {
    // An image's inode that no longer resolves belonged to an export a rescan removed or
    // replaced: ESTALE makes the kernel look the name up again (a cached dentry would otherwise
    // fail an open of the re-exported image for up to its 1 s timeout).
    return ino >= kExportBase ? ESTALE : ENOENT;
}

ExportFs::Resolved ExportFs::resolve(uint64_t ino) const {
    Resolved r;
    if (ino == kRootIno) {
        r.kind = Resolved::Kind::kRootDir;
    } else if (ino == kControlDirIno) {
        r.kind = Resolved::Kind::kControlDir;
    } else if (ino >= kGlobalFirstIno && ino < kExportBase) {
        const auto& files = control_->global_files();
        if (ino - kGlobalFirstIno < files.size()) {
            r.kind = Resolved::Kind::kControlFile;
            r.spec = &files[ino - kGlobalFirstIno];
        }
    } else if (ino >= kExportBase) {
        uint64_t id = (ino - kExportBase) / 16;
        uint64_t sub = (ino - kExportBase) % 16;
        r.e = images_->find_id(id);
        // One being removed (a rescan drains it) is gone already: an open now would get an
        // image whose chain is about to be detached, which reads as an empty disk.
        if (r.e == nullptr || r.e->removed) {
            return Resolved{};
        }
        const auto& files = control_->image_files();
        if (sub == kRawSub) {
            r.kind = Resolved::Kind::kRaw;
        } else if (sub == kDirSub) {
            r.kind = Resolved::Kind::kImageDir;
        } else if (sub - kFirstFileSub < files.size()) {
            r.kind = Resolved::Kind::kControlFile;
            r.spec = &files[sub - kFirstFileSub];
        } else {
            return Resolved{};
        }
    }
    return r;
}

bool ExportFs::fill_attr(uint64_t ino, fuse_attr* a) {
    Resolved r = resolve(ino);
    if (r.kind == Resolved::Kind::kNone) {
        return false;
    }
    *a = fuse_attr{};
    a->ino = ino;
    a->uid = options_.uid;
    a->gid = options_.gid;
    a->atime = a->mtime = a->ctime = static_cast<uint64_t>(mount_time_s_);
    a->blksize =
        4096;  // for control files too: the piece size of a long stdio line (kMaxCommandWrite)
    const uint32_t others = options_.allow_other ? 0066 : 0;
    switch (r.kind) {
        case Resolved::Kind::kRootDir:
        case Resolved::Kind::kControlDir:
        case Resolved::Kind::kImageDir:
            a->mode = S_IFDIR | 0700 | (options_.allow_other ? 0055 : 0);
            a->nlink = 2;
            break;
        case Resolved::Kind::kRaw: {
            a->mode = S_IFREG | (options_.read_only ? 0400 | (others & 0044) : 0600 | others);
            a->nlink = 1;
            a->size = r.e->backend->size();
            if (auto t = times_.find(r.e->id); t != times_.end()) {
                a->atime = static_cast<uint64_t>(t->second.atime.tv_sec);
                a->atimensec = static_cast<uint32_t>(t->second.atime.tv_nsec);
                a->mtime = static_cast<uint64_t>(t->second.mtime.tv_sec);
                a->mtimensec = static_cast<uint32_t>(t->second.mtime.tv_nsec);
                a->ctime = static_cast<uint64_t>(t->second.ctime.tv_sec);
                a->ctimensec = static_cast<uint32_t>(t->second.ctime.tv_nsec);
            }
            auto it = blocks_.find(r.e->id);
            // Never more than the disk: a figure counted before a revert to a smaller layer is
            // shown until the recount is through.
            a->blocks = it != blocks_.end() ? (std::min(it->second.bytes, a->size) + 511) / 512 : 0;
            break;
        }
        case Resolved::Kind::kControlFile:
            a->mode = S_IFREG | (r.spec->writable ? 0600 | others : 0400 | (others & 0044));
            a->nlink = 1;
            break;
        case Resolved::Kind::kNone:
            break;
    }
    return true;
}

Task<FuseReply> ExportFs::handle(FuseRequest* req) {
    switch (req->header->opcode) {
        case FUSE_LOOKUP:
            co_return co_await lookup(req);
        case FUSE_FORGET:
        case FUSE_BATCH_FORGET:
        case FUSE_INTERRUPT:
            co_return FuseReply::no_reply();  // inodes are fixed; interrupts are not honoured
        case FUSE_GETATTR:
            co_return co_await getattr(req);
        case FUSE_SETATTR:
            co_return co_await setattr(req);
        case FUSE_OPEN:
        case FUSE_OPENDIR:
            co_return co_await open(req);
        case FUSE_RELEASE:
        case FUSE_RELEASEDIR:
            co_return co_await release(req);
        case FUSE_READ:
            co_return co_await read(req);
        case FUSE_WRITE:
            co_return co_await write(req);
        case FUSE_FLUSH:
        case FUSE_FSYNC:
            co_return co_await flush(req);
        case FUSE_FSYNCDIR:
            co_return FuseReply::err(0);
        case FUSE_READDIR:
            co_return co_await readdir(req);
        case FUSE_STATFS:
            co_return co_await statfs(req);
        case FUSE_FALLOCATE:
            co_return co_await fallocate(req);
        case FUSE_LSEEK:
            co_return co_await lseek(req);
        case FUSE_DESTROY:
            co_return FuseReply::err(0);
        default:
            co_return refused_whatever_the_arguments(req->header->opcode);
    }
}

// Namespace changes are refused; the rest (xattrs, locks, ioctl, poll, copy_file_range...) is
// not implemented. Neither depends on the arguments, so a request too large for the server
// gets the same answer.
FuseReply ExportFs::refused_whatever_the_arguments(uint32_t opcode) const {
    switch (opcode) {
        case FUSE_MKNOD:
        case FUSE_MKDIR:
        case FUSE_UNLINK:
        case FUSE_RMDIR:
        case FUSE_RENAME:
        case FUSE_RENAME2:
        case FUSE_LINK:
        case FUSE_SYMLINK:
        case FUSE_CREATE:
            return FuseReply::err(options_.read_only ? EROFS : EPERM);
        default:
            return FuseReply::err(ENOSYS);
    }
}

FuseReply ExportFs::oversized(uint32_t opcode) {
    return refused_whatever_the_arguments(opcode);
}

Task<FuseReply> ExportFs::lookup(FuseRequest* req) {
    std::string_view name = name_arg(req, 0);
    Resolved parent = resolve(req->header->nodeid);
    uint64_t ino = 0;
    if (parent.kind == Resolved::Kind::kRootDir) {
        if (name == ".control") {
            ino = kControlDirIno;
        } else if (name.size() > 4 && name.substr(name.size() - 4) == ".raw") {
            if (auto e = images_->find(name.substr(0, name.size() - 4))) {
                ino = raw_ino(*e);
            }
        }
    } else if (parent.kind == Resolved::Kind::kControlDir) {
        const auto& files = control_->global_files();
        for (size_t i = 0; i < files.size(); ++i) {
            if (name == files[i].name) {
                ino = kGlobalFirstIno + i;
            }
        }
        if (ino == 0) {
            if (auto e = images_->find(name)) {
                ino = raw_ino(*e) + kDirSub;
            }
        }
    } else if (parent.kind == Resolved::Kind::kImageDir) {
        const auto& files = control_->image_files();
        for (size_t i = 0; i < files.size(); ++i) {
            if (name == files[i].name) {
                ino = raw_ino(*parent.e) + kFirstFileSub + i;
            }
        }
    } else {
        // A removed image's directory is gone, not a file.
        co_return FuseReply::err(
            parent.kind == Resolved::Kind::kNone ? gone_errno(req->header->nodeid) : ENOTDIR);
    }
    fuse_entry_out out{};
    if (ino == 0 || !fill_attr(ino, &out.attr)) {
        co_return FuseReply::err(ENOENT);
    }
    out.nodeid = ino;
    out.generation = 1;
    // Control files change at any time; everything else is ours alone to change.
    bool cacheable = resolve(ino).kind != Resolved::Kind::kControlFile;
    out.entry_valid = cacheable ? 1 : 0;
    out.attr_valid = cacheable ? 1 : 0;
    co_return FuseReply::of(out);
}

std::shared_ptr<ExportFs::Handle> ExportFs::find_handle(uint64_t fh) const {
    auto it = handles_.find(fh);
    return it != handles_.end() ? it->second : nullptr;
}

void ExportFs::forget_gone_exports() {
    // Export ids are never reused, so an entry whose export is gone is dead weight; without
    // this the maps grow by one entry per snapshot, rename or rescan for the mount's life.
    const size_t bound = 2 * images_->exports().size() + 16;
    if (blocks_.size() > bound) {
        std::erase_if(blocks_, [this](const auto& entry) {
            return !entry.second.counting && images_->find_id(entry.first) == nullptr;
        });
    }
    if (times_.size() > bound) {
        std::erase_if(
            times_, [this](const auto& entry) { return images_->find_id(entry.first) == nullptr; });
    }
}

void ExportFs::set_times(uint64_t export_id, const fuse_setattr_in& in) {
    const auto it = times_.find(export_id);
    const timespec mounted{mount_time_s_, 0};
    const timespec atime = it != times_.end() ? it->second.atime : mounted;
    const timespec mtime = it != times_.end() ? it->second.mtime : mounted;
    touch(export_id);  // the ctime moves with any change
    RawTimes& t = times_[export_id];
    if ((in.valid & FATTR_ATIME_NOW) != 0) {
        t.atime = t.ctime;
    } else if ((in.valid & FATTR_ATIME) != 0) {
        t.atime = timespec{static_cast<time_t>(in.atime), static_cast<long>(in.atimensec)};
    } else {
        t.atime = atime;
    }
    if ((in.valid & FATTR_MTIME_NOW) != 0) {
        t.mtime = t.ctime;
    } else if ((in.valid & FATTR_MTIME) != 0) {
        t.mtime = timespec{static_cast<time_t>(in.mtime), static_cast<long>(in.mtimensec)};
    } else {
        t.mtime = mtime;
    }
}

void ExportFs::touch(uint64_t export_id) {
    timespec now{};
    ::clock_gettime(CLOCK_REALTIME, &now);
    auto it = times_.find(export_id);
    if (it == times_.end()) {
        if (images_->find_id(export_id) == nullptr) {
            return;  // gone while the change ran (a rescan): nothing shows its times any more
        }
        forget_gone_exports();
        it = times_.emplace(export_id, RawTimes{timespec{mount_time_s_, 0}, {}, {}}).first;
    }
    it->second.mtime = it->second.ctime = now;
}

void ExportFs::invalidate_blocks(uint64_t export_id) {
    forget_gone_exports();
    BlocksCache& c = blocks_[export_id];
    c.valid = false;
    ++c.generation;
}

Task<void> ExportFs::refresh_blocks(std::shared_ptr<Export> e) {
    const auto now = std::chrono::steady_clock::now();
    uint64_t generation = 0;
    uint64_t off = 0;
    uint64_t data = 0;
    bool to_the_end = false;
    forget_gone_exports();
    {
        BlocksCache& before = blocks_[e->id];  // not used past this block
        if ((before.valid && now - before.at < options_.blocks_refresh) || before.counting) {
            // One walk per image at a time: on a large image it reads every L2 table, and
            // each `stat` waiting for its own walk would hold a request buffer meanwhile.
            co_return;
        }
        if (before.walk_generation !=
            before.generation) {  // none under way, or one an invalidation hit
            before.walk_generation = before.generation;
            before.walk_offset = 0;
            before.walk_data = 0;
            before.walk_start = now;
        }
        before.counting = true;
        generation = before.generation;
        off = before.walk_offset;
        data = before.walk_data;
        to_the_end = !before.valid;
    }
    BlockBackend* be = e->backend.get();
    bool failed = false;
    for (int runs = 1; off < be->size() && (to_the_end || runs <= kBlocksRunsPerStep); ++runs) {
        if (runs % kBlocksRunsPerYield == 0) {
            co_await images_->env().loop->sleep(std::chrono::nanoseconds(0));
        }
        Result<ChainStatus> st = co_await be->block_status_above(off, be->size() - off);
        if (!st) {
            failed = true;  // keep the old figure; the error surfaces on I/O
            break;
        }
        if (st->data) {
            data += st->bytes;
        }
        off += st->bytes;
    }
    // Looked up again (no reference kept across the walk): the map may have changed while
    // we counted, and an invalidation meanwhile makes the count stale.
    BlocksCache& c = blocks_[e->id];
    c.counting = false;
    if (failed || c.generation != generation) {
        c.walk_generation = UINT64_MAX;  // the next GETATTR starts afresh
    } else if (off >= be->size()) {
        c.bytes = data;
        c.at = c.walk_start;
        c.valid = true;
        c.walk_generation = UINT64_MAX;
    } else {
        c.walk_offset = off;
        c.walk_data = data;
    }
}

Task<FuseReply> ExportFs::getattr(FuseRequest* req) {
    uint64_t ino = req->header->nodeid;
    Resolved r = resolve(ino);
    if (r.kind == Resolved::Kind::kRaw) {
        co_await refresh_blocks(r.e);
    }
    // A control file's size is that of what a read returns: the kernel stops some reads at
    // the size it last got (splice, so sendfile and Python's shutil.copy; asynchronous direct
    // reads). Through a handle, its snapshot taken at open; else what an open would show now.
    std::optional<uint64_t> control_size;
    if (r.kind == Resolved::Kind::kControlFile) {
        fuse_getattr_in gin{};
        std::shared_ptr<Handle> h;
        if (parse_arg(req, &gin) && (gin.getattr_flags & FUSE_GETATTR_FH) != 0) {
            h = find_handle(gin.fh);
        }
        if (h != nullptr && !h->raw) {
            control_size = h->content.size();
        } else {
            std::string content = co_await control_->read(r.e, r.spec->file);
            control_size = content.size();
        }
    }
    fuse_attr_out out{};
    if (!fill_attr(ino, &out.attr)) {
        co_return FuseReply::err(gone_errno(ino));
    }
    if (control_size) {
        out.attr.size = *control_size;
    }
    out.attr_valid = r.kind == Resolved::Kind::kControlFile ? 0 : 1;
    co_return FuseReply::of(out);
}

Task<FuseReply> ExportFs::setattr(FuseRequest* req) {
    fuse_setattr_in in{};
    if (!parse_arg(req, &in)) {
        co_return FuseReply::err(EINVAL);
    }
    uint64_t ino = req->header->nodeid;
    Resolved r = resolve(ino);
    if (r.kind == Resolved::Kind::kNone) {
        co_return FuseReply::err(gone_errno(ino));
    }
    // On a read-only mount only a control file's truncation (a shell's `>`) goes through, as
    // the no-op it always is; the kernel does not refuse the rest (see fuse_mount.cc).
    const uint32_t changes = FATTR_MODE | FATTR_UID | FATTR_GID | FATTR_SIZE | FATTR_ATIME |
                             FATTR_MTIME | FATTR_ATIME_NOW | FATTR_MTIME_NOW | FATTR_CTIME;
    if (options_.read_only && (in.valid & changes) != 0 &&
        !(r.kind == Resolved::Kind::kControlFile && (in.valid & changes) == FATTR_SIZE)) {
        co_return FuseReply::err(EROFS);
    }
    // Modes and owners are the mount's: a change is refused, but a request that changes
    // nothing succeeds (cp -p, rsync -p and install -m into NAME.raw ask for the same mode).
    fuse_attr now{};
    fill_attr(ino, &now);
    if (((in.valid & FATTR_MODE) != 0 && (in.mode & 07777) != (now.mode & 07777)) ||
        ((in.valid & FATTR_UID) != 0 && in.uid != now.uid) ||
        ((in.valid & FATTR_GID) != 0 && in.gid != now.gid)) {
        co_return FuseReply::err(EPERM);
    }
    if (r.kind == Resolved::Kind::kRaw &&
        (in.valid & (FATTR_ATIME | FATTR_MTIME | FATTR_ATIME_NOW | FATTR_MTIME_NOW)) != 0) {
        set_times(r.e->id, in);
    }
    if ((in.valid & FATTR_SIZE) != 0) {
        if (r.kind == Resolved::Kind::kRaw) {
            uint64_t cur = r.e->backend->size();
            // An open with O_TRUNC arrives as a truncation to 0 without a file handle, and is
            // ignored, as a block device ignores it (`dd of=NAME.raw` without conv=notrunc).
            // truncate(2) to 0 by path looks the same and is ignored as well. With
            // FUSE_ATOMIC_O_TRUNC the kernel would instead take the file for emptied until its
            // next getattr: asynchronous direct reads (a loop device in direct-I/O mode, QEMU
            // with aio=io_uring) then failed or read nothing past offset 0.
            const bool open_truncation = in.size == 0 && (in.valid & FATTR_FH) == 0;
            if (in.size < cur && !open_truncation) {
                log_->warn("{}.raw: refusing to shrink from {} to {} bytes", r.e->name, cur,
                           in.size);
                co_return FuseReply::err(EPERM);
            }
            if (in.size > cur && in.size % kSectorBytes != 0) {
                log_->warn(
                    "{}.raw: refusing to grow to {} bytes, not a whole number of {}-byte "
                    "sectors",
                    r.e->name, in.size, kSectorBytes);
                co_return FuseReply::err(EINVAL);
            }
            if (in.size > cur) {
                Status st = co_await claim_for(r.e, "truncate");
                if (st) {
                    st = co_await r.e->backend->truncate(in.size);
                }
                if (!st) {
                    log_->error("{}.raw: grow to {}: {}", r.e->name, in.size, st.error().message());
                    co_return FuseReply::err(st.error().errnum);
                }
                invalidate_blocks(r.e->id);
                touch(r.e->id);
            }
        } else if (r.kind != Resolved::Kind::kControlFile) {
            co_return FuseReply::err(EISDIR);
        }
        // Control files: O_TRUNC of `echo x > file` is a no-op.
    }
    fuse_attr_out out{};
    if (!fill_attr(ino, &out.attr)) {
        co_return FuseReply::err(gone_errno(ino));  // removed while it grew (a rescan)
    }
    out.attr_valid = 1;
    co_return FuseReply::of(out);
}

Task<FuseReply> ExportFs::open(FuseRequest* req) {
    fuse_open_in in{};
    if (!parse_arg(req, &in)) {
        co_return FuseReply::err(EINVAL);
    }
    uint64_t ino = req->header->nodeid;
    Resolved r = resolve(ino);
    auto h = std::make_shared<Handle>();
    h->ino = ino;
    fuse_open_out out{};
    bool writing = (in.flags & O_ACCMODE) != O_RDONLY;
    switch (r.kind) {
        case Resolved::Kind::kNone:
            co_return FuseReply::err(gone_errno(ino));
        case Resolved::Kind::kRaw:
            if (writing && options_.read_only) {
                co_return FuseReply::err(EROFS);
            }
            // O_TRUNC is ignored, as a block device ignores it, so that `dd of=NAME.raw` works
            // without conv=notrunc: the kernel sends it as a setattr to size 0 (see setattr).
            h->raw = true;
            h->writing = writing;
            h->e = r.e;
            r.e->backend->open_file();
            // No page cache: the image is shared with jobs and must stay coherent; several
            // direct writes may run at once.
            out.open_flags = FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES;
            break;
        case Resolved::Kind::kControlFile:
            if (writing && !r.spec->writable) {
                co_return FuseReply::err(EACCES);
            }
            h->file = r.spec->file;
            h->e = r.e;
            if (!writing || (in.flags & O_ACCMODE) == O_RDWR) {
                h->content = co_await control_->read(r.e, r.spec->file);
            }
            out.open_flags = FOPEN_DIRECT_IO;
            break;
        default:  // directories
            break;
    }
    uint64_t fh = next_fh_++;
    out.fh = fh;
    handles_.emplace(fh, std::move(h));
    co_return FuseReply::of(out);
}

Task<FuseReply> ExportFs::release(FuseRequest* req) {
    fuse_release_in in{};
    if (!parse_arg(req, &in)) {
        co_return FuseReply::err(EINVAL);
    }
    auto it = handles_.find(in.fh);
    if (it != handles_.end()) {
        if (it->second->raw) {
            it->second->e->backend->release_file();
            if (it->second->e->backend->open_count() == 0) {
                read_ahead_.closed(it->second->e->id);  // the memory of its windows goes
            }
        }
        handles_.erase(it);
    }
    co_return FuseReply::err(0);
}

Task<FuseReply> ExportFs::read(FuseRequest* req) {
    fuse_read_in in{};
    if (!parse_arg(req, &in)) {
        co_return FuseReply::err(EINVAL);
    }
    std::shared_ptr<Handle> h = find_handle(in.fh);
    if (h == nullptr) {
        co_return FuseReply::err(EBADF);
    }
    if (overflows(in.offset, in.size) || in.offset > static_cast<uint64_t>(INT64_MAX)) {
        co_return FuseReply::err(EINVAL);
    }
    if (!h->raw) {
        // Copied into the reply: the handle may be released before the reply is written.
        const std::string& c = h->content;
        if (in.offset >= c.size()) {
            co_return FuseReply::view({});
        }
        size_t n = std::min<size_t>(in.size, c.size() - in.offset);
        const auto* p = reinterpret_cast<const uint8_t*>(c.data()) + in.offset;
        co_return FuseReply::bytes(std::vector<uint8_t>(p, p + n));
    }
    std::shared_ptr<Export> e = h->e;
    if (e->removed) {
        co_return FuseReply::err(ENODEV);  // its chain is detached: not an empty disk
    }
    uint64_t size = e->backend->size();
    if (in.offset >= size) {
        co_return FuseReply::view({});  // short read at EOF
    }
    size_t n = std::min<uint64_t>({in.size, size - in.offset, req->scratch.size()});
    MutBuf buf = req->scratch.first(n);
    if (read_ahead_.streams() > 2 * images_->exports().size() + 16) {
        read_ahead_.forget_gone([this](uint64_t id) { return images_->find_id(id) != nullptr; });
    }
    Status st = co_await read_ahead_.read(e, in.offset, buf);
    if (!st) {
        log_->error("{}.raw: read of {} bytes at {}: {}", e->name, n, in.offset,
                    st.error().message());
        co_return FuseReply::err(st.error().errnum);
    }
    co_return FuseReply::view(buf);
}

Task<FuseReply> ExportFs::write(FuseRequest* req) {
    fuse_write_in in{};
    if (!parse_arg(req, &in) || req->payload.size() != in.size) {
        co_return FuseReply::err(EINVAL);
    }
    std::shared_ptr<Handle> h = find_handle(in.fh);
    if (h == nullptr) {
        co_return FuseReply::err(EBADF);
    }
    if (overflows(in.offset, in.size) || in.offset > static_cast<uint64_t>(INT64_MAX)) {
        co_return FuseReply::err(EINVAL);
    }
    fuse_write_out out{};
    std::shared_ptr<Export> e = h->e;
    if (!h->raw) {
        if (e != nullptr && e->removed) {
            co_return FuseReply::err(ENODEV);
        }
        const std::string_view written(reinterpret_cast<const char*>(req->payload.data()),
                                       req->payload.size());
        const bool line_ends = !written.empty() && written.back() == '\n';
        if (h->split_line) {
            // The rest of a line refused as too long; the write that ends it ends the refusal,
            // and the handle takes commands again.
            h->split_line = !line_ends;
            co_return FuseReply::err(EINVAL);
        }
        // Set before the write runs: a piece of the same line may arrive while it does. A
        // long write that ends its line is refused whole, and what follows is a new line.
        h->split_line = may_be_a_piece(written) && !line_ends;
        std::string text(reinterpret_cast<const char*>(req->payload.data()), req->payload.size());
        Status st = co_await control_->write(e, h->file, std::move(text), req->header->pid);
        if (!st) {
            co_return FuseReply::err(st.error().errnum);
        }
        if (e != nullptr) {
            touch(e->id);  // a revert changes what NAME.raw holds; others count as changes too
            // A count under way would mix two chains: it starts again, and the figure it
            // replaces stays until then (a walk to the end, as for a first stat, would hold
            // up the next `ls -l` of a large disk after every command).
            ++blocks_[e->id].generation;
        }
        out.size = in.size;
        co_return FuseReply::of(out);
    }
    if (e->removed) {
        co_return FuseReply::err(ENODEV);
    }
    uint64_t size = e->backend->size();
    if (in.offset >= size) {
        co_return FuseReply::err(ENOSPC);  // a disk does not grow by writing past its end
    }
    uint64_t n = std::min<uint64_t>(in.size, size - in.offset);
    Status st = co_await claim_for(e, "write");
    if (st) {
        st = co_await e->backend->write(in.offset, req->payload.first(n));
    }
    if (st && (in.flags & O_DSYNC) != 0) {
        // O_SYNC, O_DSYNC or RWF_DSYNC: the kernel sends no FSYNC after such a write to a
        // FOPEN_DIRECT_IO file and leaves its durability to us (the flag is in O_SYNC too).
        st = co_await e->backend->flush();
    }
    if (!st) {
        log_->error("{}.raw: write of {} bytes at {}: {}", e->name, n, in.offset,
                    st.error().message());
        co_return FuseReply::err(st.error().errnum);
    }
    touch(e->id);
    out.size = static_cast<uint32_t>(n);
    co_return FuseReply::of(out);
}

Task<Status> ExportFs::claim_for(std::shared_ptr<Export> e, std::string op) {
    if (!e->backend->claim_pending()) {
        co_return Status{};
    }
    co_return co_await images_->claim_writes(std::move(e), std::move(op));
}

Task<FuseReply> ExportFs::flush(FuseRequest* req) {
    const uint64_t ino = req->header->nodeid;
    Resolved r = resolve(ino);
    if (r.kind == Resolved::Kind::kNone && ino >= kExportBase &&
        (ino - kExportBase) % 16 == kRawSub && !options_.read_only) {
        // The image went while this file was open (a rescan that raced its open): what was
        // written through it cannot be vouched for.
        co_return FuseReply::err(ENODEV);
    }
    if (r.kind != Resolved::Kind::kRaw || options_.read_only) {
        co_return FuseReply::err(0);
    }
    // A descriptor that could not write has nothing to make durable: a reader's close does
    // not fail because the image's storage cannot take writes (a full pool, a failing disk).
    // Only a close (FLUSH) takes this shortcut: fsync(2) on any descriptor asks for what
    // every descriptor wrote, as `sync FILE` does through a read-only one.
    fuse_flush_in in{};
    if (req->header->opcode == FUSE_FLUSH && parse_arg(req, &in)) {
        std::shared_ptr<Handle> h = find_handle(in.fh);
        if (h != nullptr && !h->writing) {
            co_return FuseReply::err(0);
        }
    }
    Status st = co_await r.e->backend->flush();
    if (!st) {
        log_->error("{}.raw: flush: {}", r.e->name, st.error().message());
        co_return FuseReply::err(st.error().errnum);
    }
    co_return FuseReply::err(0);
}

Task<FuseReply> ExportFs::readdir(FuseRequest* req) {
    fuse_read_in in{};
    if (!parse_arg(req, &in)) {
        co_return FuseReply::err(EINVAL);
    }
    uint64_t ino = req->header->nodeid;
    Resolved r = resolve(ino);
    // Each entry's offset cookie is a key that keeps its order when other entries come or
    // go (a rescan between two READDIRs of a long listing): ".", "..", then inode numbers,
    // which grow with the export id in the order exports() keeps, then ".control". A
    // position would shift and skip an entry.
    constexpr uint64_t kDotCookie = 1;
    constexpr uint64_t kDotDotCookie = 2;
    constexpr uint64_t kControlDirCookie = 1ULL << 62;  // after every inode number
    struct Entry {
        uint64_t ino;
        uint64_t cookie;
        std::string name;
        uint32_t type;
    };
    const uint64_t parent_ino = r.kind == Resolved::Kind::kImageDir ? kControlDirIno : kRootIno;
    std::vector<Entry> entries = {{ino, kDotCookie, ".", DT_DIR},
                                  {parent_ino, kDotDotCookie, "..", DT_DIR}};
    if (r.kind == Resolved::Kind::kRootDir) {
        for (const auto& e : images_->exports()) {
            entries.push_back({raw_ino(*e), raw_ino(*e), e->name + ".raw", DT_REG});
        }
        entries.push_back({kControlDirIno, kControlDirCookie, ".control", DT_DIR});
    } else if (r.kind == Resolved::Kind::kControlDir) {
        const auto& files = control_->global_files();
        for (size_t i = 0; i < files.size(); ++i) {
            entries.push_back({kGlobalFirstIno + i, kGlobalFirstIno + i, files[i].name, DT_REG});
        }
        for (const auto& e : images_->exports()) {
            const uint64_t dir = raw_ino(*e) + kDirSub;
            entries.push_back({dir, dir, e->name, DT_DIR});
        }
    } else if (r.kind == Resolved::Kind::kImageDir) {
        const auto& files = control_->image_files();
        for (size_t i = 0; i < files.size(); ++i) {
            const uint64_t file = raw_ino(*r.e) + kFirstFileSub + i;
            entries.push_back({file, file, files[i].name, DT_REG});
        }
    } else {
        co_return FuseReply::err(r.kind == Resolved::Kind::kNone ? gone_errno(req->header->nodeid)
                                                                 : ENOTDIR);
    }
    std::vector<uint8_t> out;
    for (const Entry& en : entries) {
        assert(&en == &entries.front() || en.cookie > (&en - 1)->cookie);
        if (en.cookie <= in.offset) {
            continue;
        }
        size_t rec = FUSE_DIRENT_ALIGN(FUSE_NAME_OFFSET + en.name.size());
        if (out.size() + rec > in.size) {
            break;
        }
        append_dirent(&out, en.ino, en.cookie, en.type, en.name);
    }
    co_return FuseReply::bytes(std::move(out));
}

Task<FuseReply> ExportFs::statfs(FuseRequest* /*req*/) {
    Store* store = images_->store();
    if (statfs_asking_ && !statfs_last_.has_value()) {
        // The first query is under way: its answer, even a failure, is everyone's.
        while (!statfs_last_.has_value()) {
            co_await statfs_waiters_.wait();
        }
        co_return statfs_reply(*statfs_last_);
    }
    const auto now = std::chrono::steady_clock::now();
    // While one query is under way, the others take the last answer (even a failure); a
    // figure is kept for statfs_refresh, a failure only until someone asks again.
    if (statfs_last_.has_value() &&
        (statfs_asking_ || (statfs_last_->ok() && now - statfs_at_ < options_.statfs_refresh))) {
        co_return statfs_reply(*statfs_last_);
    }
    statfs_asking_ = true;
    // Asking the image directory for its room can block: it runs off the loop.
    std::function<Result<StoreSpace>()> query = [store] { return store->space(); };
    Result<StoreSpace> got =
        co_await images_->offloader()->run<Result<StoreSpace>>(std::move(query));
    statfs_asking_ = false;
    statfs_at_ = std::chrono::steady_clock::now();
    statfs_last_ = got;
    statfs_waiters_.notify_all();
    if (!got) {
        // Said, not hidden behind zeros: `df` showing a full or empty file system would be a
        // wrong answer about the room images have. Logged when the failures begin, not for
        // every query of a tool that polls.
        if (!statfs_failing_) {
            log_->warn("statfs: cannot tell the room in {}: {}", store->display_name(),
                       got.error().message());
        }
        statfs_failing_ = true;
    } else {
        statfs_failing_ = false;
    }
    co_return statfs_reply(got);
}

FuseReply ExportFs::statfs_reply(const Result<StoreSpace>& got) {
    if (!got) {
        return FuseReply::err(got.error().errnum);
    }
    fuse_statfs_out out{};
    out.st.blocks = got->blocks;
    out.st.bfree = got->free_blocks;
    out.st.bavail = got->available_blocks;
    out.st.files = got->files;
    out.st.ffree = got->free_files;
    out.st.bsize = got->transfer_bytes;
    out.st.frsize = got->block_bytes;
    out.st.namelen = 255;
    return FuseReply::of(out);
}

Task<FuseReply> ExportFs::fallocate(FuseRequest* req) {
    fuse_fallocate_in in{};
    if (!parse_arg(req, &in)) {
        co_return FuseReply::err(EINVAL);
    }
    Resolved r = resolve(req->header->nodeid);
    if (r.kind != Resolved::Kind::kRaw) {
        co_return FuseReply::err(EOPNOTSUPP);
    }
    if (options_.read_only) {
        co_return FuseReply::err(EROFS);
    }
    if (overflows(in.offset, in.length)) {
        co_return FuseReply::err(EINVAL);
    }
    const uint32_t keep = FALLOC_FL_KEEP_SIZE;
    const bool supported = in.mode == 0 || in.mode == keep ||
                           in.mode == (FALLOC_FL_PUNCH_HOLE | keep) ||
                           (in.mode & ~keep) == FALLOC_FL_ZERO_RANGE;
    const uint64_t end = in.offset + in.length;
    // Refused, or nothing to write (a disk's bytes are all there): no claim on the image, which
    // in a pool would make this host its writer.
    if (!supported) {
        co_return FuseReply::err(EOPNOTSUPP);
    }
    if (in.mode == keep || (in.mode == 0 && end <= r.e->backend->size())) {
        co_return FuseReply::err(0);
    }
    if ((in.mode & keep) == 0 && end > r.e->backend->size() && end % kSectorBytes != 0) {
        co_return FuseReply::err(EINVAL);  // it would grow the disk by part of a sector
    }
    Status st = co_await claim_for(r.e, "fallocate");
    BlockBackend* be = r.e->backend.get();
    uint64_t size = be->size();
    if (!st) {
        // Refused below, with the log line every failed fallocate gets.
    } else if (in.mode == 0 || in.mode == keep) {
        if (in.mode == 0 && end > size) {
            st = co_await be->truncate(end);  // preallocating past the end grows the disk
        }
    } else if (in.mode == (FALLOC_FL_PUNCH_HOLE | keep)) {
        // A punched range must read as zeros afterwards: deallocate and make it zero.
        if (in.offset < size) {
            st = co_await be->write_zeroes(in.offset, std::min(end, size) - in.offset, true);
        }
    } else if ((in.mode & ~keep) == FALLOC_FL_ZERO_RANGE) {
        if ((in.mode & keep) == 0 && end > size) {
            st = co_await be->truncate(end);
            size = be->size();
        }
        if (st && in.offset < size) {
            st = co_await be->write_zeroes(in.offset, std::min(end, size) - in.offset, false);
        }
    }
    if (!st) {
        log_->error("{}.raw: fallocate mode {:#x}: {}", r.e->name, in.mode, st.error().message());
        co_return FuseReply::err(st.error().errnum);
    }
    invalidate_blocks(r.e->id);
    touch(r.e->id);
    co_return FuseReply::err(0);
}

Task<FuseReply> ExportFs::lseek(FuseRequest* req) {
    fuse_lseek_in in{};
    if (!parse_arg(req, &in)) {
        co_return FuseReply::err(EINVAL);
    }
    Resolved r = resolve(req->header->nodeid);
    if (in.whence != SEEK_DATA && in.whence != SEEK_HOLE) {
        co_return FuseReply::err(EINVAL);
    }
    if (r.kind == Resolved::Kind::kControlFile) {
        co_return FuseReply::err(ENXIO);  // its size is 0: every offset is past the end
    }
    if (r.kind != Resolved::Kind::kRaw) {
        co_return FuseReply::err(r.kind == Resolved::Kind::kNone ? gone_errno(req->header->nodeid)
                                                                 : EINVAL);
    }
    BlockBackend* be = r.e->backend.get();
    uint64_t size = be->size();
    uint64_t off = in.offset;
    if (off >= size) {
        co_return FuseReply::err(ENXIO);
    }
    const bool want_data = in.whence == SEEK_DATA;
    for (int runs = 1; off < size; ++runs) {
        if (runs % kBlocksRunsPerYield == 0) {  // a SEEK_HOLE in a full image walks to its end
            co_await images_->env().loop->sleep(std::chrono::nanoseconds(0));
        }
        Result<ChainStatus> st = co_await be->block_status_above(off, size - off);
        if (!st) {
            co_return FuseReply::err(st.error().errnum);
        }
        if (st->data == want_data) {
            break;
        }
        off += st->bytes;
    }
    if (off >= size && want_data) {
        co_return FuseReply::err(ENXIO);
    }
    fuse_lseek_out out{};
    out.offset = std::min(off, size);
    co_return FuseReply::of(out);
}

}  // namespace imgfs
