#include "fuse/fuse_mount.h"

#define FUSE_USE_VERSION 35
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <spawn.h>
#include <thread>
#include <unistd.h>

#include <fuse_lowlevel.h>
#include <sys/mount.h>
#include <sys/wait.h>

#include "core/unique_fd.h"
#include "fuse/mount_table.h"

namespace imgfs {

namespace {

// libfuse splits -o at commas and takes a backslash as an escape: a directory named "a,b"
// would otherwise end fsname at "a" and pass "b" on as an (unknown) option.
std::string escape_option_value(const std::string& value) {
    std::string out;
    for (char c : value) {
        if (c == ',' || c == '\\') {
            out += '\\';
        }
        out += c;
    }
    return out;
}

}  // namespace

Result<std::unique_ptr<FuseMount>> FuseMount::mount(const std::string& mountpoint,
                                                    const MountOptions& options) {
    std::string opts = "default_permissions,nosuid,nodev,subtype=imgfs";
    opts += ",fsname=" +
            escape_option_value(options.fsname.empty() ? std::string("imgfs") : options.fsname);
    opts += fmt::format(",max_read={}", options.max_read_bytes);
    // `ro` is not passed to the kernel: a read-only file system refuses every open for
    // writing, and a read-only mount must still take a rescan through its control file. The
    // daemon refuses every change itself with EROFS (ExportFs), and losetup, refused a
    // read-write open, falls back to a read-only loop device as on a read-only file system.
    if (options.allow_other) {
        opts += ",allow_other";
    }
    for (const auto& e : options.extra) {
        opts += "," + e;
    }
    // libfuse parses these like a command line; its own loop is never run.
    std::vector<std::string> argv_s = {"imgfs", "-o", opts};
    std::vector<char*> argv;
    for (auto& a : argv_s) {
        argv.push_back(a.data());
    }
    fuse_args args = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());
    fuse_lowlevel_ops ops{};
    std::unique_ptr<FuseMount> m(new FuseMount());
    m->session_ = fuse_session_new(&args, &ops, sizeof ops, nullptr);
    fuse_opt_free_args(&args);
    if (m->session_ == nullptr) {
        return make_error(EINVAL, "cannot set up a FUSE session (mount options: {})", opts);
    }
    if (fuse_session_mount(m->session_, mountpoint.c_str()) != 0) {
        // libfuse says why only on stderr; the usual reason that is not about the mount point.
        UniqueFd probe(::open("/dev/null", O_RDONLY | O_CLOEXEC));
        if (!probe.valid() && (errno == EMFILE || errno == ENFILE)) {
            return make_error(errno, "cannot mount on {}: out of file descriptors (see ulimit -n)",
                              mountpoint);
        }
        return make_error(EPERM,
                          "cannot mount on {} (is /dev/fuse usable, and the mount point an "
                          "empty directory you own?)",
                          mountpoint);
    }
    m->mountpoint_ = mountpoint;
    m->mounted_ = true;
    // Read from the mount table, not by a stat of the mount point, which would wait for a
    // server that is not serving yet.
    std::vector<std::string> here = mounts_at(mountpoint);
    m->identity_ = here.empty() ? std::string() : here.back();
    return m;
}

FuseMount::~FuseMount() {
    (void)unmount();
    if (session_ != nullptr) {
        fuse_session_destroy(session_);
    }
}

int FuseMount::fd() const {
    return fuse_session_fd(session_);
}

FuseMount::Here FuseMount::where_now() const {
    if (identity_.empty()) {
        return Here::kUnknown;
    }
    std::vector<std::string> here = mounts_at(mountpoint_);
    if (!here.empty() && here.back() == identity_) {
        return Here::kOnTop;
    }
    return std::find(here.begin(), here.end(), identity_) != here.end() ? Here::kCovered
                                                                        : Here::kGone;
}

Status FuseMount::detach() {
    if (!mounted_ || detached_) {
        return {};
    }
    switch (where_now()) {
        case Here::kGone:
            // Detached already (`umount -l` from outside): the path may hold another mount
            // now, which a detach by path would take away.
            detached_ = true;
            return {};
        case Here::kCovered:
            // A detach by path acts on the mount on top, which is not ours.
            return make_error(EBUSY,
                              "cannot detach {}: another mount covers it; unmount that "
                              "first",
                              mountpoint_);
        case Here::kOnTop:
        case Here::kUnknown:
            break;
    }
    Status st = detach_path();
    if (st) {
        detached_ = true;
    }
    return st;
}

Status FuseMount::detach_path() {
    if (::geteuid() == 0) {
        // On a thread of its own, never on a loop thread. If this drops the last reference to
        // the mount, the kernel tears the connection down as task work of the calling thread,
        // and that waits for every FUSE-over-io_uring queue entry to be released, including
        // ones whose request delivery is task work queued for the loop thread that owns them.
        // Called there, the teardown (run first) would wait for the delivery behind it, for
        // ever, in an uninterruptible sleep. Nor may a loop thread wait for this one: its
        // ring defers completions (DEFER_TASKRUN) to its own io_uring_enter, so the daemon
        // calls detach() from its offloader while the loop goes on serving.
        int err = 0;
        std::thread detacher([this, &err] {
            if (::umount2(mountpoint_.c_str(), MNT_DETACH | UMOUNT_NOFOLLOW) != 0) {
                err = errno;
            }
        });
        detacher.join();
        if (err != 0 && err != EINVAL) {
            return make_error(err, "cannot detach {}", mountpoint_);
        }
        return {};
    }
    // An ordinary user's mount goes through the setuid helper, as libfuse's own unmount does.
    std::vector<std::string> args = {"fusermount3", "-u", "-z", "-q", "--", mountpoint_};
    std::vector<char*> argv;
    for (auto& a : args) {
        argv.push_back(a.data());
    }
    argv.push_back(nullptr);
    // The daemon blocks the signals it reads through its signalfd, and ignores SIGPIPE: the
    // helper gets the defaults, so that a stuck one can still be stopped.
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    sigset_t none;
    sigemptyset(&none);
    sigset_t defaults;
    sigfillset(&defaults);
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setsigdefault(&attr, &defaults);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    pid_t pid = 0;
    const int r = ::posix_spawnp(&pid, "fusermount3", nullptr, &attr, argv.data(), environ);
    posix_spawnattr_destroy(&attr);
    if (r != 0) {
        return make_error(r, "cannot run fusermount3 to detach {}", mountpoint_);
    }
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        return make_error(EIO, "fusermount3 could not detach {}", mountpoint_);
    }
    return {};
}

Status FuseMount::unmount(bool connection_aborted) {
    if (!mounted_) {
        return {};
    }
    mounted_ = false;
    // libfuse closes fd() and unmounts, unless the descriptor reports an error, which it takes
    // for a mount that is gone already.
    fuse_session_unmount(session_);
    // An aborted connection reports that error too, yet stays mounted: every access fails with
    // ENOTCONN and a new mount there is refused. Only then: an aborted mount still holds its
    // identity, while after an ordinary unmount the kernel may have given the same numbers to
    // a newer mount at the same path.
    if (connection_aborted && !detached_ && where_now() == Here::kOnTop) {
        return detach_path();
    }
    return {};
}

}  // namespace imgfs
