#include "drivers/local_store.h"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>

#include <fmt/format.h>
#include <linux/openat2.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>

#include "core/blocking_io.h"

namespace imgfs {

namespace {

// A name the name operations take: relative, and with no "." or ".." component, so that it
// cannot climb out (layers may sit in subdirectories: "sub/base.qcow2"). Its directories are
// resolved with openat2 as open() resolves paths (see NameAt), which also catches symbolic links.
Status check_name(const std::string& name) {
    bool bad = name.empty() || name.front() == '/';
    size_t start = 0;
    while (!bad && start <= name.size()) {
        size_t end = name.find('/', start);
        std::string part = name.substr(start, end == std::string::npos ? end : end - start);
        bad = part.empty() || part == "." || part == "..";
        start = end == std::string::npos ? name.size() + 1 : end + 1;
    }
    if (bad) {
        return make_error(EINVAL, "'{}' is not a file name in the image directory", name);
    }
    return {};
}

// Where a name operation acts: the directory holding the name's last component, opened beneath
// the image directory, and that component. Without it, a directory of the name swapped for a
// symbolic link (after the chain was opened through it) would make a chain edit create, rename
// or delete a file anywhere the daemon may write.
struct NameAt {
    UniqueFd opened;  // the parent, when it is a subdirectory
    int dir = -1;     // the parent: opened, or the image directory
    std::string leaf;
};

Result<NameAt> name_at(int dir_fd, const std::string& name) {
    TRY(check_name(name));
    NameAt at;
    const size_t slash = name.rfind('/');
    if (slash == std::string::npos) {
        at.dir = dir_fd;
        at.leaf = name;
        return at;
    }
    const std::string parent = name.substr(0, slash);
    open_how how{};
    how.flags = O_PATH | O_DIRECTORY | O_CLOEXEC;
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
    long fd = ::syscall(SYS_openat2, dir_fd, parent.c_str(), &how, sizeof how);
    if (fd < 0) {
        if (errno == EXDEV) {
            return make_error(EPERM, "'{}' resolves outside the image directory", name);
        }
        return make_error(errno, "cannot open the directory of '{}'", name);
    }
    at.opened = UniqueFd(static_cast<int>(fd));
    at.dir = at.opened.get();
    at.leaf = name.substr(slash + 1);
    return at;
}

}  // namespace

Result<std::unique_ptr<LocalFile>> LocalFile::from_fd(UniqueFd fd, const std::string& name) {
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) {
        return make_error(errno, "stat {}", name);
    }
    return std::make_unique<LocalFile>(std::move(fd), FileId{st.st_dev, st.st_ino});
}

Result<uint64_t> LocalFile::size() {
    struct stat st {};
    if (::fstat(fd_.get(), &st) != 0) {
        return make_error(errno, "stat");
    }
    return static_cast<uint64_t>(st.st_size);
}

Result<size_t> LocalFile::read_at(MutBuf buf, uint64_t offset) {
    return pread_full(fd_.get(), buf, offset);
}

Result<std::shared_ptr<Node>> LocalFile::into_node(NodeEnv env, std::string name,
                                                   const FileOptions& options) {
    TRY_ASSIGN(std::shared_ptr<FileNode> node,
               FileNode::from_fd(env, std::move(name), std::move(fd_), options));
    return std::shared_ptr<Node>(std::move(node));
}

namespace {

// Images are opened with O_NONBLOCK, because a name can point at a FIFO (a backing name
// is whatever the image says) and opening one for reading waits for a writer: the mount,
// or the whole event loop, would hang. Only a regular file or a block device is an image;
// the flag is then cleared, as io_uring would otherwise fail buffered I/O with EAGAIN.
Result<UniqueFd> image_fd(int raw_fd, const std::string& path) {
    UniqueFd fd(raw_fd);
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) {
        return make_error(errno, "stat '{}'", path);
    }
    if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
        return make_error(EINVAL, "'{}' is not a regular file or block device", path);
    }
    int flags = ::fcntl(fd.get(), F_GETFL);
    if (flags < 0 || ::fcntl(fd.get(), F_SETFL, flags & ~O_NONBLOCK) != 0) {
        return make_error(errno, "fcntl '{}'", path);
    }
    return fd;
}

int open_flags(bool read_only, bool direct) {
    return O_CLOEXEC | O_NONBLOCK | (read_only ? O_RDONLY : O_RDWR) | (direct ? O_DIRECT : 0);
}

}  // namespace

Result<std::unique_ptr<StoreFile>> open_host_file(const std::string& path, bool read_only,
                                                  bool direct) {
    int raw_fd = ::open(path.c_str(), open_flags(read_only, direct));
    if (raw_fd < 0) {
        return make_error(errno, "cannot open '{}'", path);
    }
    TRY_ASSIGN(UniqueFd fd, image_fd(raw_fd, path));
    TRY_ASSIGN(std::unique_ptr<LocalFile> file, LocalFile::from_fd(std::move(fd), path));
    return std::unique_ptr<StoreFile>(std::move(file));
}

LocalDirStore::LocalDirStore(UniqueFd dir_fd, std::string path)
    : dir_fd_(std::move(dir_fd)), path_(std::move(path)), real_(real_dir_path(dir_fd_.get())) {}

Result<std::unique_ptr<LocalDirStore>> LocalDirStore::open_dir(const std::string& path) {
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!fd.valid()) {
        return make_error(errno, "cannot open image directory {}", path);
    }
    return std::make_unique<LocalDirStore>(std::move(fd), path);
}

std::unique_ptr<LocalDirStore> LocalDirStore::over(int dir_fd) {
    UniqueFd dup(::fcntl(dir_fd, F_DUPFD_CLOEXEC, 0));
    std::string real = real_dir_path(dup.get());
    return std::make_unique<LocalDirStore>(std::move(dup), real);
}

Result<std::vector<StoreEntry>> LocalDirStore::list() {
    // readdir on a duplicate: closedir closes it, and the store's own descriptor stays open.
    int dup = ::fcntl(dir_fd_.get(), F_DUPFD_CLOEXEC, 0);
    if (dup < 0) {
        return make_error(errno, "{}", path_);
    }
    DIR* d = ::fdopendir(dup);
    if (d == nullptr) {
        int err = errno;
        ::close(dup);
        return make_error(err, "cannot read {}", path_);
    }
    ::rewinddir(d);  // the duplicate shares its offset with earlier listings
    std::vector<StoreEntry> out;
    while (dirent* ent = ::readdir(d)) {
        struct stat st {};
        if (::fstatat(dir_fd_.get(), ent->d_name, &st, 0) == 0 && S_ISREG(st.st_mode)) {
            out.push_back(StoreEntry{ent->d_name, {st.st_dev, st.st_ino}});
        }
    }
    ::closedir(d);
    std::sort(out.begin(), out.end(),
              [](const StoreEntry& a, const StoreEntry& b) { return a.name < b.name; });
    return out;
}

Result<FileId> LocalDirStore::id_of(const std::string& name, bool follow_links) {
    struct stat st {};
    if (::fstatat(dir_fd_.get(), name.c_str(), &st, follow_links ? 0 : AT_SYMLINK_NOFOLLOW) != 0) {
        return make_error(errno, "{}", name);
    }
    return FileId{st.st_dev, st.st_ino};
}

Result<std::unique_ptr<StoreFile>> LocalDirStore::open(const std::string& name, bool read_only,
                                                       bool direct) {
    TRY_ASSIGN(UniqueFd fd, open_beneath(dir_fd_.get(), name, read_only, direct));
    TRY_ASSIGN(std::unique_ptr<LocalFile> file, LocalFile::from_fd(std::move(fd), name));
    return std::unique_ptr<StoreFile>(std::move(file));
}

Task<Result<std::unique_ptr<StoreFile>>> LocalDirStore::open_from_loop(std::string name,
                                                                       FileOptions options) {
    co_return open(name, options.read_only, options.direct);
}

Result<std::unique_ptr<StoreFile>> LocalDirStore::create_exclusive(const std::string& name) {
    TRY_ASSIGN(NameAt at, name_at(dir_fd_.get(), name));
    int fd = ::openat(at.dir, at.leaf.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0644);
    if (fd < 0) {
        return make_error(errno, "cannot create {}", name);
    }
    TRY_ASSIGN(std::unique_ptr<LocalFile> file, LocalFile::from_fd(UniqueFd(fd), name));
    return std::unique_ptr<StoreFile>(std::move(file));
}

Status LocalDirStore::rename_noreplace(const std::string& from, const std::string& to) {
    TRY_ASSIGN(NameAt src, name_at(dir_fd_.get(), from));
    TRY_ASSIGN(NameAt dst, name_at(dir_fd_.get(), to));
    if (::renameat2(src.dir, src.leaf.c_str(), dst.dir, dst.leaf.c_str(), RENAME_NOREPLACE) != 0) {
        return make_error(errno, "cannot rename {} to {}", from, to);
    }
    return {};
}

Status LocalDirStore::add_name(const std::string& existing, const std::string& name) {
    TRY_ASSIGN(NameAt src, name_at(dir_fd_.get(), existing));
    TRY_ASSIGN(NameAt dst, name_at(dir_fd_.get(), name));
    if (::linkat(src.dir, src.leaf.c_str(), dst.dir, dst.leaf.c_str(), 0) != 0) {
        return make_error(errno, "cannot link {} to {}", existing, name);
    }
    return {};
}

Status LocalDirStore::remove(const std::string& name) {
    TRY_ASSIGN(NameAt at, name_at(dir_fd_.get(), name));
    if (::unlinkat(at.dir, at.leaf.c_str(), 0) != 0) {
        return make_error(errno, "cannot remove {}", name);
    }
    return {};
}

Status LocalDirStore::sync() {
    if (::fsync(dir_fd_.get()) != 0) {
        return make_error(errno, "fsync of the image directory");
    }
    return {};
}

Result<StoreSpace> LocalDirStore::space() {
    struct statfs st {};
    if (::fstatfs(dir_fd_.get(), &st) != 0) {
        return make_error(errno, "statfs of the image directory");
    }
    StoreSpace s;
    s.blocks = st.f_blocks;
    s.free_blocks = st.f_bfree;
    s.available_blocks = st.f_bavail;
    s.files = st.f_files;
    s.free_files = st.f_ffree;
    s.block_bytes = static_cast<uint32_t>(st.f_frsize != 0 ? st.f_frsize : st.f_bsize);
    s.transfer_bytes = static_cast<uint32_t>(st.f_bsize);
    return s;
}

Status LocalDirStore::lock_for_serving() {
    if (::flock(dir_fd_.get(), LOCK_EX | LOCK_NB) != 0) {
        return make_error(errno, "{} is locked by another process", path_);
    }
    return {};
}

Result<UniqueFd> open_beneath(int dir_fd, const std::string& path, bool read_only, bool direct) {
    open_how how{};
    how.flags = static_cast<uint64_t>(open_flags(read_only, direct));
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
    long fd = ::syscall(SYS_openat2, dir_fd, path.c_str(), &how, sizeof how);
    if (fd < 0) {
        int err = errno;
        if (err == EXDEV) {
            return make_error(EPERM, "'{}' resolves outside the image directory", path);
        }
        if (err == ELOOP) {
            // Escaping is EXDEV under RESOLVE_BENEATH, so this is a loop of links within.
            return make_error(ELOOP, "'{}' is a loop of symbolic links", path);
        }
        return make_error(err, "cannot open '{}'", path);
    }
    return image_fd(static_cast<int>(fd), path);
}

std::string real_dir_path(int dir_fd) {
    char real[PATH_MAX];
    if (::realpath(fmt::format("/proc/self/fd/{}", dir_fd).c_str(), real) == nullptr) {
        return {};
    }
    return real;
}

}  // namespace imgfs
