// `imgfs mount`: the daemon. Mounts, serves until unmounted or signalled, then lets requests in
// flight finish, flushes and closes every image, and exits.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "drivers/rbd/rados.h"
#include "fuse/fuse_mount.h"
#include "fuse/fuse_uring.h"
#include "jobs/image_set.h"

namespace imgfs {

struct MountCommand {
    std::string image_dir;  // a directory's absolute path, or "rbd:POOL[/NAMESPACE]"
    RadosOptions rados;     // for a pool
    std::string mountpoint;
    bool foreground = false;
    bool verbose = false;
    MountOptions mount;
    ImageSetOptions images;
    fuse_uring::Mode uring = fuse_uring::Mode::kAuto;  // -o uring=
    uint32_t ring_queues = 0;  // -o ring_queues= (tests): FUSE ring queues to register; 0: the CPUs
    uint32_t threads = 0;      // -o threads=: event loops serving FUSE ring queues; 0: the default
    uint32_t poll_us = kDefaultPollUs;  // -o poll_us=: EventLoop::Options::poll_max
    // 30 us: 4k reads at queue depth 1 from a qcow2 in the page cache, 2-CPU machine: 13.6-14.5k
    // IOPS without, 13.9-18.2k with; from disk unchanged (2026-12-04, docs/benchmarks.md).
    static constexpr uint32_t kDefaultPollUs = 30;
};

/// Runs the mount command; returns the process exit code. Without `foreground` the calling
/// process returns (0 once the mount is up, 1 with the reason on stderr) and a child serves.
int run_mount(const MountCommand& cmd);

/// Where the daemon of the mount at `mountpoint` records its pid (see unmount), in `dir` or
/// else this process's runtime directory.
std::string pid_file_for(const std::string& mountpoint, const std::string& dir = {});

/// Where that daemon, when its images did not all close cleanly, leaves the reason for
/// `imgfs unmount` to report (it is not the daemon's parent, so it cannot see its exit status).
std::string failure_file_for(const std::string& mountpoint, const std::string& dir = {});

/// The runtime directories a daemon run by `uid` uses: /run/imgfs for root, else
/// $XDG_RUNTIME_DIR/imgfs (where a session sets it, /run/user/UID) or /tmp/imgfs-UID.
std::vector<std::string> runtime_dirs_of(uint32_t uid);

/// `imgfs unmount`: detaches the mount and waits until its daemon has closed the images. Fails
/// if the daemon does not finish in `timeout_s`, or reported that an image did not close.
int run_unmount(const std::string& mountpoint, int timeout_s);

}  // namespace imgfs
