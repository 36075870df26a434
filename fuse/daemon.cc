#include "fuse/daemon.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <signal.h>
#include <spawn.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "core/event_loop.h"
#include "core/graph.h"
#include "core/loop_thread.h"
#include "core/task_scope.h"
#include "drivers/local_store.h"
#include "drivers/rbd/rbd_store.h"
#include "fuse/export_fs.h"
#include "fuse/fuse_server.h"
#include "fuse/mount_table.h"
#include "fuse/standard_control.h"
#include "fuse/syslog_logger.h"
#include "jobs/job_manager.h"

namespace imgfs {

namespace {

// Tells the parent (still on the terminal) how mounting went: "" for success, else the reason.
class ReadyPipe {
  public:
    ReadyPipe() = default;
    explicit ReadyPipe(int fd) : fd_(fd) {}
    void report(const std::string& error) {
        if (fd_.valid()) {
            std::string msg = error.empty() ? std::string("OK") : error;
            [[maybe_unused]] ssize_t n = ::write(fd_.get(), msg.data(), msg.size());
            fd_.reset();
        }
    }
    [[nodiscard]] bool active() const { return fd_.valid(); }

  private:
    UniqueFd fd_;
};

std::string runtime_dir() {
    if (::geteuid() == 0) {
        return "/run/imgfs";
    }
    if (const char* x = std::getenv("XDG_RUNTIME_DIR")) {
        return std::string(x) + "/imgfs";
    }
    return fmt::format("/tmp/imgfs-{}", ::geteuid());
}

// Makes the runtime directory, or checks the one there: a directory of this user that nobody
// else can write. /tmp/imgfs-UID (no XDG_RUNTIME_DIR) could have been made by another user,
// with links in it that would make the daemon write over this user's files.
Status prepare_runtime_dir(const std::string& dir) {
    ::mkdir(dir.c_str(), 0700);
    struct stat st {};
    if (::lstat(dir.c_str(), &st) != 0) {
        return make_error(errno, "cannot make the runtime directory {}", dir);
    }
    if (!S_ISDIR(st.st_mode) || st.st_uid != ::geteuid() || (st.st_mode & 022) != 0) {
        return make_error(EPERM,
                          "{} is not a directory of this user that only it can write: no pid "
                          "file is kept, so `imgfs unmount` cannot wait for this daemon; remove "
                          "it or set XDG_RUNTIME_DIR",
                          dir);
    }
    return {};
}

// Writes a file of the runtime directory without following a link planted in its place.
void write_runtime_file(const std::string& path, const std::string& text, Logger* log) {
    UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600));
    if (!fd.valid() ||
        ::write(fd.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size())) {
        log->warn("cannot write {}: {}", path, strerror(errno));
    }
}

// Parent side of daemonising: waits for the child's report and turns it into an exit code.
int wait_for_child(int read_fd) {
    std::string msg;
    char buf[512];
    ssize_t n = 0;
    while ((n = ::read(read_fd, buf, sizeof buf)) > 0) {
        msg.append(buf, static_cast<size_t>(n));
    }
    ::close(read_fd);
    if (msg == "OK") {
        return 0;
    }
    std::fprintf(stderr, "imgfs: %s\n",
                 msg.empty() ? "the daemon exited before mounting" : msg.c_str());
    return 1;
}

// kill(pid, 0) also succeeds for a zombie; a process that has exited but not been reaped yet
// (its parent may be slow to do so) has closed its images all the same.
bool process_running(pid_t pid) {
    std::ifstream f(fmt::format("/proc/{}/stat", pid));
    std::string stat((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    size_t paren = stat.rfind(')');
    if (stat.empty() || paren == std::string::npos || paren + 2 >= stat.size()) {
        return false;
    }
    char state = stat[paren + 2];
    return state != 'Z' && state != 'X';
}

// Whether the process runs an imgfs binary: a pid file left by a killed daemon may name a pid
// that an unrelated process has been given since. By its executable, not its name: through
// mount(8) the daemon runs as mount.fuse.imgfs. Where that cannot be read (another user's
// process), it is taken for one.
bool runs_imgfs(pid_t pid) {
    char exe[PATH_MAX];
    const ssize_t n = ::readlink(fmt::format("/proc/{}/exe", pid).c_str(), exe, sizeof exe - 1);
    if (n < 0) {
        return true;
    }
    const std::string_view path(exe, static_cast<size_t>(n));
    const size_t slash = path.rfind('/');
    return path.substr(slash == std::string_view::npos ? 0 : slash + 1).find("imgfs") !=
           std::string_view::npos;
}

// Whether the pid file still names this daemon.
bool owns_runtime_file(const std::string& pid_file) {
    pid_t recorded = 0;
    return !pid_file.empty() && (std::ifstream(pid_file) >> recorded) && recorded == ::getpid();
}

struct Daemon {
    EventLoop* loop;
    Logger* log;
    FuseMount* mount;
    int signal_fd;
    Offloader* offloader;  // where a signal's detach runs (see watch_signals)
    bool done = false;
    bool detach_wanted = false;  // set with a SIGUSR1 by code on the loop that cannot wait
};

// Waits for SIGTERM/SIGINT/SIGHUP and unmounts, which ends the server.
Task<void> watch_signals(Daemon* d) {
    signalfd_siginfo info{};
    while (!d->done) {
        int32_t res = co_await d->loop->read_some(
            d->signal_fd, MutBuf(reinterpret_cast<uint8_t*>(&info), sizeof info), 0);
        if (res < 0 && res != -EINTR && res != -EAGAIN) {
            break;
        }
        if (d->done) {
            break;
        }
        if (res == sizeof info && (info.ssi_signo != SIGUSR1 || d->detach_wanted)) {
            if (info.ssi_signo != SIGUSR1) {
                d->log->info("signal {} received: unmounting {}", info.ssi_signo,
                             d->mount->mountpoint());
            }
            d->detach_wanted = false;
            // Off the loop, which keeps serving meanwhile: the kernel's teardown of the
            // connection, which the detach may start, waits for the ring entries, and their
            // completions are deferred work that only this loop's own io_uring_enter runs.
            FuseMount* mount = d->mount;
            std::function<Status()> detach = [mount] { return mount->detach(); };
            Status st = co_await d->offloader->run<Status>(std::move(detach));
            if (!st) {
                d->log->error("{}", st.error().message());
            } else if (!d->done) {
                // Said, or a daemon that goes on after the signal looks stuck.
                d->log->info(
                    "{} detached; the daemon ends once nothing has its files open (a loop "
                    "device, a VM)",
                    d->mount->mountpoint());
            }
        }
    }
}

/// Serves until the connection closes, then stops the jobs and closes the images; fails if an
/// image did not flush or close cleanly.
Task<Status> serve(Daemon* d, FuseServer* server, ImageSet* images, JobManager* jobs) {
    TaskScope scope(d->loop);
    scope.spawn(watch_signals(d));
    co_await server->run();
    d->done = true;
    ::kill(::getpid(), SIGUSR1);  // wakes the signal watcher so it can finish
    co_await scope.join();
    d->log->info("connection closed; stopping jobs, flushing and closing images");
    co_await jobs->shutdown();
    Status st = co_await images->close_all();
    if (!st) {
        d->log->error("closing images: {}", st.error().message());
    }
    co_return st;
}

// Two daemons serving one directory would each write its images behind the other's back, and a
// mount over a mount hides the first one's files. The store holds its lock for as long as the
// daemon serves it (ImageSet owns the store).
Status check_mount_safety(const MountCommand& cmd, Store* store) {
    if (std::optional<MountEntry> m = imgfs_mount_at(cmd.mountpoint)) {
        return make_error(EBUSY, "{} is already an imgfs mount (of {}); unmount it first",
                          cmd.mountpoint, m->source);
    }
    if (!store->lock_for_serving()) {
        std::string where;
        for (const MountEntry& e : read_mount_table()) {
            if (e.type == "fuse.imgfs" && e.source == cmd.image_dir) {
                where = " at " + e.target;
            }
        }
        return make_error(EBUSY, "{} is already served by another imgfs mount{}", cmd.image_dir,
                          where.empty() ? std::string(" (or a daemon starting up)") : where);
    }
    return {};
}

// The image directory, or the Ceph pool (connecting to the cluster: the daemon has forked by
// now, as librados requires).
// The loops besides the main one that serve FUSE ring queues (-o threads=N): none unless the
// ring transport can be used, and never more than there are queues. The default is one loop:
// every request is handled on the main loop anyway, and on a 2-CPU machine the hop to it and
// back cost more than the second loop saved (docs/benchmarks.md, 2026-12-04).
Result<std::vector<std::unique_ptr<LoopThread>>> start_ring_loops(const MountCommand& cmd,
                                                                  EventLoop::Options options,
                                                                  Logger* log) {
    std::vector<std::unique_ptr<LoopThread>> loops;
    uint32_t wanted = cmd.threads == 0 ? 1 : cmd.threads;
    if (wanted <= 1) {
        return loops;
    }
    if (!options.big_sqes) {
        log->info("threads={}: the /dev/fuse transport is served by one event loop", wanted);
        return loops;
    }
    Result<uint32_t> queues = fuse_uring::possible_cpus();
    if (queues && wanted > *queues) {
        log->info("threads={}: the kernel keeps {} FUSE ring queues; using {} event loops", wanted,
                  *queues, *queues);
        wanted = *queues;
    }
    for (uint32_t i = 1; i < wanted; ++i) {
        TRY_ASSIGN(std::unique_ptr<LoopThread> t,
                   LoopThread::start(options, fmt::format("imgfs-loop{}", i)));
        loops.push_back(std::move(t));
    }
    return loops;
}

Result<std::unique_ptr<Store>> open_store(const MountCommand& cmd, EventLoop* loop) {
    if (is_rbd_spec(cmd.image_dir)) {
        TRY_ASSIGN(RbdLocation where, parse_rbd_location(cmd.image_dir));
        TRY_ASSIGN(std::unique_ptr<RbdStore> pool, RbdStore::open(where, cmd.rados, loop));
        return std::unique_ptr<Store>(std::move(pool));
    }
    TRY_ASSIGN(std::unique_ptr<LocalDirStore> dir, LocalDirStore::open_dir(cmd.image_dir));
    return std::unique_ptr<Store>(std::move(dir));
}

// Users put filesystems on NAME.raw through loop devices, whose writeback comes back here. If
// this process entered direct reclaim and reclaim waited for that writeback, neither would
// finish: PR_SET_IO_FLUSHER keeps the kernel from issuing I/O on our behalf while reclaiming.
// Set before any thread starts, so that every thread (and io_uring's workers) inherits it.
void mark_io_flusher(Logger* log) {
    if (::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0) {
        log->warn(
            "cannot mark the daemon as an I/O flusher ({}): under memory pressure, a "
            "filesystem loop-mounted on an export can deadlock it (needs "
            "CAP_SYS_RESOURCE)",
            std::strerror(errno));
    }
}

// Descriptors held back from the start-up scan for the mount itself: 16, or an eighth of a
// very low limit, which must leave the scan some.
int mount_fd_reserve() {
    struct rlimit limit {};
    if (::getrlimit(RLIMIT_NOFILE, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY) {
        return 16;
    }
    return static_cast<int>(std::min<rlim_t>(16, limit.rlim_cur / 8));
}

// Descriptors of /dev/null kept open until release(), so that others cannot take the last ones.
class FdReserve {
  public:
    explicit FdReserve(int count) {
        for (int i = 0; i < count; ++i) {
            UniqueFd fd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
            if (!fd.valid()) {
                break;
            }
            fds_.push_back(std::move(fd));
        }
    }
    FdReserve(const FdReserve&) = delete;
    FdReserve& operator=(const FdReserve&) = delete;
    void release() { fds_.clear(); }

  private:
    std::vector<UniqueFd> fds_;
};

int serve_mount(const MountCommand& cmd, ReadyPipe* ready, Logger* log) {
    // First: the warning below may go to a stderr whose reader has gone.
    ::signal(SIGPIPE, SIG_IGN);
    mark_io_flusher(log);
    sigset_t mask;
    sigemptyset(&mask);
    for (int s : {SIGTERM, SIGINT, SIGHUP, SIGUSR1}) {
        // A signal the daemon was started ignoring (nohup's SIGHUP, SIGINT for a shell's
        // background job) stays ignored: blocked for the signalfd it would be read all the
        // same.
        struct sigaction was {};
        if ((s == SIGINT || s == SIGHUP) && ::sigaction(s, nullptr, &was) == 0 &&
            was.sa_handler == SIG_IGN) {
            continue;
        }
        sigaddset(&mask, s);
    }
    ::sigprocmask(SIG_BLOCK, &mask, nullptr);
    // A write past RLIMIT_FSIZE (ulimit -f, systemd's LimitFSIZE=) must fail with EFBIG, not
    // end the daemon: small writes are made on the loop's own thread (drivers/file.cc).
    ::signal(SIGXFSZ, SIG_IGN);
    UniqueFd sfd(::signalfd(-1, &mask, SFD_CLOEXEC));
    auto fail = [&](const std::string& msg) {
        log->error("{}", msg);
        ready->report(msg);
        return 1;
    };
    // The transport is chosen in INIT, but the ring it needs is set up now.
    EventLoop::Options loop_options;
    loop_options.poll_max = std::chrono::microseconds(cmd.poll_us);
    if (cmd.uring != fuse_uring::Mode::kOff) {
        std::string why = fuse_uring::unavailable_reason();
        if (!why.empty() && cmd.uring == fuse_uring::Mode::kOn) {
            return fail("uring=on: FUSE-over-io_uring is not available: " + why);
        }
        loop_options.big_sqes = why.empty();
    }
    // Deferred completions only where FUSE over io_uring is expected: they cost the /dev/fuse
    // transport its inline reads (FuseServer::reader), 97-110k instead of 260-277k 4k reads
    // at QD32 of a raw image on tmpfs, and what they gain is in the ring transport's requests.
    loop_options.defer_completions = loop_options.big_sqes;
    // Room for every FUSE ring entry (one queue per possible CPU, 64 entries each, all of
    // them on one loop by default) to complete at once, and for the file I/O beside them.
    Result<uint32_t> possible = fuse_uring::possible_cpus();
    loop_options.cq_entries = std::max<unsigned>(
        4096, (possible ? *possible : 1) * FuseServerOptions{}.uring_entries_per_queue + 1024);
    auto loop_r = EventLoop::create(loop_options);
    if (!loop_r) {
        return fail(loop_r.error().message());
    }
    std::unique_ptr<EventLoop> loop = std::move(*loop_r);
    // Destruction order: these outlive the server below, whose ring entries they serve.
    auto ring_threads = start_ring_loops(cmd, loop_options, log);
    if (!ring_threads) {
        return fail(ring_threads.error().message());
    }
    Result<std::unique_ptr<Store>> store = open_store(cmd, loop.get());
    if (!store) {
        return fail(store.error().message());
    }
    if (Status safe = check_mount_safety(cmd, store->get()); !safe) {
        return fail(safe.error().message());
    }
    // Destruction order: images (nodes) before the graph, the graph before the loop.
    Graph graph;
    NodeEnv env{loop.get(), log, &graph};
    int exit_code = 0;
    {
        ImageSet images(env, std::move(*store), cmd.images);
        // A directory with more layers than RLIMIT_NOFILE allows: the scan leaves out (and
        // reports) what it could not open, and the mount, which needs descriptors of its own
        // (/dev/fuse, fusermount3's socket), still gets them.
        FdReserve reserve(mount_fd_reserve());
        Status scanned = sync_wait(loop.get(), images.scan(ImageSet::kMountLockGrace));
        if (!scanned) {
            return fail(scanned.error().message());
        }
        reserve.release();
        MountOptions mo = cmd.mount;
        if (mo.fsname.empty()) {
            mo.fsname = cmd.image_dir;
        }
        auto mount = FuseMount::mount(cmd.mountpoint, mo);
        if (!mount) {
            if (Status closed = sync_wait(loop.get(), images.close_all()); !closed) {
                log->warn("closing the images after the failed mount: {}",
                          closed.error().message());
            }
            return fail(mount.error().message());
        }
        std::string pid_file = pid_file_for(cmd.mountpoint);
        std::string failure_file = failure_file_for(cmd.mountpoint);
        if (Status dir = prepare_runtime_dir(runtime_dir()); !dir) {
            log->warn("{}", dir.error().message());
            pid_file.clear();
            failure_file.clear();
        } else {
            ::unlink(failure_file.c_str());  // an earlier daemon's, already reported or not
            write_runtime_file(pid_file, fmt::format("{}\n", ::getpid()), log);
        }
        JobManager jobs(&images, log);
        StandardControl control(&images, &jobs, log);
        ExportFsOptions fo;
        fo.read_only = cmd.mount.read_only;
        fo.allow_other = cmd.mount.allow_other;
        fo.uid = ::getuid();
        fo.gid = ::getgid();
        ExportFs fs(&images, &control, log, fo);
        FuseServerOptions so;
        so.uring = cmd.uring;
        so.ring_queues = cmd.ring_queues;
        for (const auto& t : *ring_threads) {
            so.ring_loops.push_back(t->loop());
        }
        FuseServer server(loop.get(), (*mount)->fd(), &fs, log, so);
        images.set_transport([&server] { return server.transport(); });
        Daemon d{loop.get(), log, mount->get(), sfd.get(), images.offloader()};
        // The mount is reported up once the kernel's INIT is answered: until then nothing can
        // use it, and INIT can still refuse the connection (uring=on without the ring).
        bool init_failed = false;
        bool init_answered = false;
        server.on_init([&](const Status& init) {
            init_answered = true;
            if (init) {
                log->info("serving {} on {} ({} image{}) through {}", cmd.image_dir, cmd.mountpoint,
                          images.exports().size(), images.exports().size() == 1 ? "" : "s",
                          server.transport());
                ready->report("");
                return;
            }
            init_failed = true;
            log->error("{}", init.error().message());
            ready->report(init.error().message());
            // Nothing has the mount open yet. Detached by the signal watcher, off the loop, for
            // the reason a signal's detach is (ring entries may be registered already).
            d.detach_wanted = true;
            ::kill(::getpid(), SIGUSR1);
        });
        // A mount whose images did not all close cleanly did not end well: its exit status
        // says so (for systemd or whoever ran `mount -f`), beside the log lines.
        Status served = sync_wait(loop.get(), serve(&d, &server, &images, &jobs));
        if (!init_answered) {
            // The server stopped before INIT (its buffers could not be reserved, or the
            // connection was aborted): the mount never worked.
            const std::string why = "the FUSE connection ended before the kernel initialised it";
            log->error("{}", why);
            ready->report(why);
            exit_code = 1;
        } else if (init_failed) {
            exit_code = 1;
        } else if (Status ended = server.end_status(); !ended || !served) {
            // The connection ended other than by an unmount (an abort: the requests in flight
            // failed), or an image did not close cleanly.
            exit_code = 1;
            std::string why = !ended ? ended.error().message() : std::string();
            if (!served) {
                why += (why.empty() ? "" : "; ") + served.error().message();
            }
            // Written before the pid file goes: `imgfs unmount` looks once the daemon is gone.
            // Not if another daemon serves the mount point now (after `umount -l`): the report
            // would be read as that one's. The log has it either way.
            if (!failure_file.empty() && owns_runtime_file(pid_file)) {
                write_runtime_file(failure_file, why + "\n", log);
            }
        }
        images.set_transport({});  // the server goes before the images
        Status ended = server.end_status();
        const bool aborted = !ended && ended.error().errnum == ECONNABORTED;
        if (Status st = (*mount)->unmount(aborted); !st) {
            log->error("{}", st.error().message());
            exit_code = 1;
        }
        // Only if it is still this daemon's: after `umount -l` another daemon may serve the
        // same mount point now, and `imgfs unmount` waits for that one through the file.
        if (owns_runtime_file(pid_file)) {
            ::unlink(pid_file.c_str());
        }
        log->info("unmounted {}", cmd.mountpoint);
        if (images.store()->closes_stalled()) {
            // Everything that carries data has been written or has failed; what is left would
            // only wait out the cluster's deadline again (a few times per locked image) to
            // release what Ceph releases itself once this client is gone, as after a kill.
            log->warn(
                "the Ceph cluster stopped answering while the images closed: exiting "
                "without waiting for their last closes; their locks pass to another "
                "client once Ceph sees this one gone");
            std::fflush(nullptr);
            ::_exit(exit_code);
        }
    }
    return exit_code;
}

}  // namespace

std::string pid_file_for(const std::string& mountpoint, const std::string& dir) {
    // Keyed by the mount point's absolute path: the daemon must not stat its own mount point
    // before it serves requests.
    return fmt::format("{}/{:016x}.pid", dir.empty() ? runtime_dir() : dir,
                       std::hash<std::string>{}(mountpoint));
}

std::string failure_file_for(const std::string& mountpoint, const std::string& dir) {
    return fmt::format("{}/{:016x}.failed", dir.empty() ? runtime_dir() : dir,
                       std::hash<std::string>{}(mountpoint));
}

std::vector<std::string> runtime_dirs_of(uint32_t uid) {
    if (uid == 0) {
        return {"/run/imgfs"};
    }
    return {fmt::format("/run/user/{}/imgfs", uid), fmt::format("/tmp/imgfs-{}", uid)};
}

namespace {

// Each image layer takes a descriptor, and a second one once a read misses the page cache
// (drivers/file.h); a mount of many images would reach the usual soft limit of 1,024 long
// before the hard one. The daemon uses no select(). At most 65,536: the programs it starts
// (fusermount3, umount) inherit the limit, and some close every descriptor up to it.
void raise_open_file_limit() {
    constexpr rlim_t kMost = 65536;
    struct rlimit limit {};
    if (::getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < kMost &&
        limit.rlim_cur < limit.rlim_max) {
        limit.rlim_cur = std::min(limit.rlim_max, kMost);
        ::setrlimit(RLIMIT_NOFILE, &limit);
    }
}

// Whoever started the daemon may have closed its standard descriptors. The first files it
// opens would take their numbers (the signal descriptor, the ring, an eventfd), and then log
// lines written to stderr, or the background daemon's dup2 onto 0-2, would land on those.
void occupy_standard_fds() {
    for (;;) {
        int fd = ::open("/dev/null", O_RDWR | O_CLOEXEC);
        if (fd < 0) {
            return;
        }
        if (fd > STDERR_FILENO) {
            ::close(fd);
            return;
        }
        // Kept open as 0, 1 or 2 (the daemon's dup2 later replaces it without the flag).
        ::fcntl(fd, F_SETFD, 0);
    }
}

}  // namespace

int run_mount(const MountCommand& cmd) {
    occupy_standard_fds();
    raise_open_file_limit();
    struct stat st {};
    if (is_rbd_spec(cmd.image_dir)) {
        if (Result<RbdLocation> where = parse_rbd_location(cmd.image_dir); !where) {
            std::fprintf(stderr, "imgfs: %s\n", where.error().context.c_str());
            return 1;
        }
    } else if (::stat(cmd.image_dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
        std::fprintf(stderr, "imgfs: %s is not a directory\n", cmd.image_dir.c_str());
        return 1;
    }
    if (::stat(cmd.mountpoint.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
        std::fprintf(stderr, "imgfs: mount point %s is not a directory\n", cmd.mountpoint.c_str());
        return 1;
    }
    if (cmd.foreground) {
        StderrLogger log;
        log.set_verbose(cmd.verbose);
        ReadyPipe none;
        return serve_mount(cmd, &none, &log);
    }
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) {
        std::perror("imgfs: pipe");
        return 1;
    }
    pid_t pid = ::fork();
    if (pid < 0) {
        std::perror("imgfs: fork");
        return 1;
    }
    if (pid > 0) {
        ::close(fds[1]);
        return wait_for_child(fds[0]);
    }
    ::close(fds[0]);
    ::setsid();
    if (::chdir("/") != 0) {
        // Harmless: paths were made absolute by the command line.
    }
    int null = ::open("/dev/null", O_RDWR);
    if (null >= 0) {
        ::dup2(null, 0);
        ::dup2(null, 1);
        ::dup2(null, 2);
        ::close(null);
    }
    SyslogLogger log;
    log.set_verbose(cmd.verbose);
    ReadyPipe ready(fds[1]);
    ::_exit(serve_mount(cmd, &ready, &log));
}

namespace {

// Runs a program (looked up in PATH) with its output discarded; true if it exited 0.
// Runs a tool with its output kept from the terminal; on failure `why` gets its last line of
// stderr (or why it could not run).
bool run_quietly(const std::vector<std::string>& argv, std::string* why) {
    std::vector<char*> args;
    for (const std::string& a : argv) {
        args.push_back(const_cast<char*>(a.c_str()));
    }
    args.push_back(nullptr);
    int pipe_fds[2];
    if (::pipe2(pipe_fds, O_CLOEXEC) != 0) {
        *why = fmt::format("{}: {}", argv[0], std::strerror(errno));
        return false;
    }
    UniqueFd read_end(pipe_fds[0]);
    UniqueFd write_end(pipe_fds[1]);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_adddup2(&actions, write_end.get(), STDERR_FILENO);
    pid_t pid = 0;
    int err = posix_spawnp(&pid, args[0], &actions, nullptr, args.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    write_end.reset();
    if (err != 0) {
        *why = fmt::format("{}: {}", argv[0], std::strerror(err));
        return false;
    }
    std::string output;
    char buf[512];
    ssize_t n = 0;
    while ((n = ::read(read_end.get(), buf, sizeof buf)) > 0 || (n < 0 && errno == EINTR)) {
        output.append(buf, static_cast<size_t>(std::max<ssize_t>(n, 0)));
    }
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        return true;
    }
    while (!output.empty() && (output.back() == '\n' || output.back() == ' ')) {
        output.pop_back();
    }
    const size_t last = output.rfind('\n');
    *why = last == std::string::npos ? output : output.substr(last + 1);
    if (why->empty()) {
        *why = fmt::format("{} failed", argv[0]);
    }
    return false;
}

}  // namespace

int run_unmount(const std::string& mountpoint, int timeout_s) {
    std::optional<MountEntry> entry = imgfs_mount_at(mountpoint);
    if (!entry) {
        // A daemon whose connection was aborted detaches its mount itself and leaves its
        // reason behind: said here, to whoever comes to unmount it.
        std::string reason;
        for (const std::string& dir : runtime_dirs_of(::getuid())) {
            const std::string failure_file = failure_file_for(mountpoint, dir);
            if (std::ifstream failed(failure_file); failed && std::getline(failed, reason)) {
                ::unlink(failure_file.c_str());
                break;
            }
        }
        if (!reason.empty()) {
            std::fprintf(stderr, "imgfs: %s is not mounted any more: its daemon ended: %s\n",
                         mountpoint.c_str(), reason.c_str());
        } else {
            std::fprintf(stderr, "imgfs: %s is not an imgfs mount\n", mountpoint.c_str());
        }
        return 1;
    }
    // The daemon's files are in its runtime directory, which need not be the caller's (a user's
    // mount unmounted with sudo, or from a session without XDG_RUNTIME_DIR): the caller's own
    // first, then the usual ones of the uid that mounted it.
    std::vector<std::string> dirs{runtime_dir()};
    if (entry->owner) {
        for (std::string& d : runtime_dirs_of(*entry->owner)) {
            dirs.push_back(std::move(d));
        }
    }
    pid_t pid = 0;
    std::string daemon_dir;
    // A daemon removes its pid file when it exits, so a pid file whose process is gone means
    // the daemon was killed or crashed: the unmount below only detaches a dead mount.
    std::string dead_pid_file;
    for (const std::string& dir : dirs) {
        pid_t found = 0;
        const std::string pid_file = pid_file_for(mountpoint, dir);
        std::ifstream(pid_file) >> found;
        if (found > 0 && process_running(found) && runs_imgfs(found)) {
            pid = found;
            daemon_dir = dir;
            break;
        }
        if (found > 0 && dead_pid_file.empty()) {
            dead_pid_file = pid_file;
        }
    }
    // fusermount3 for a mount by an ordinary user, umount for root's (and for fstab mounts).
    // Run without a shell: the mount point is not quoted for one.
    std::string fusermount_why;
    std::string umount_why;
    if (!run_quietly({"fusermount3", "-u", mountpoint}, &fusermount_why) &&
        !run_quietly({"umount", mountpoint}, &umount_why)) {
        std::string users;
        for (const std::string& u : mount_users(mountpoint)) {
            users += "; " + u;
        }
        if (users.empty()) {
            // Not (visibly) busy: say what the tools said (permissions, a tool missing...).
            std::fprintf(stderr, "imgfs: cannot unmount %s: %s; %s\n", mountpoint.c_str(),
                         fusermount_why.c_str(), umount_why.c_str());
        } else {
            std::fprintf(stderr, "imgfs: cannot unmount %s: it is busy%s\n", mountpoint.c_str(),
                         users.c_str());
        }
        return 1;
    }
    if (pid == 0 && !dead_pid_file.empty()) {
        ::unlink(dead_pid_file.c_str());
        std::fprintf(
            stderr,
            "imgfs: unmounted %s, but its daemon had already exited without closing "
            "the images (killed or crashed): writes not acknowledged by fsync may be "
            "lost (the images stay consistent; the next mount finishes any chain edit it cut "
            "short)\n",
            mountpoint.c_str());
        return 1;
    }
    // The daemon flushes and closes its images after the unmount: wait for it.
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
    while (pid > 0 && process_running(pid)) {
        if (std::chrono::steady_clock::now() > deadline) {
            std::fprintf(stderr, "imgfs: daemon %d still running after %d s\n", pid, timeout_s);
            return 1;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    const std::string failure_file = failure_file_for(mountpoint, daemon_dir);
    std::string reason;
    if (std::ifstream failed(failure_file); failed && std::getline(failed, reason)) {
        ::unlink(failure_file.c_str());
        std::fprintf(stderr,
                     "imgfs: unmounted %s, but its daemon did not end well: %s; writes not "
                     "acknowledged by fsync may be lost (its log has each one)\n",
                     mountpoint.c_str(), reason.c_str());
        return 1;
    }
    return 0;
}

}  // namespace imgfs
