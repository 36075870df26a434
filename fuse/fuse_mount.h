// FuseMount: mounting and unmounting through libfuse (which knows how to do it as root and, via
// fusermount3, as a user). libfuse is used for nothing else: requests are read from the /dev/fuse
// descriptor by FuseServer through the event loop.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "core/result.h"

struct fuse_session;

namespace imgfs {

struct MountOptions {
    bool read_only = false;
    bool allow_other = false;
    uint32_t max_read_bytes = 1U << 20;
    std::string fsname;              // shown in /proc/mounts (the image directory)
    std::vector<std::string> extra;  // further -o options libfuse accepts
};

class FuseMount {
  public:
    /// Mounts at `mountpoint` with default_permissions, nosuid and nodev.
    static Result<std::unique_ptr<FuseMount>> mount(const std::string& mountpoint,
                                                    const MountOptions& options);
    FuseMount(const FuseMount&) = delete;
    FuseMount& operator=(const FuseMount&) = delete;
    /// Unmounts if still mounted.
    ~FuseMount();

    /// The /dev/fuse descriptor (owned by the session).
    [[nodiscard]] int fd() const;
    /// Detaches the mount and closes fd(); outstanding reads on it then fail with ENODEV. Only
    /// once nothing serves fd() any more: a descriptor closed under the server makes its
    /// replies fail, and one reopened under the same number would receive them.
    /// With `connection_aborted` (the server read ECONNABORTED), also detaches the mount,
    /// which libfuse leaves in place then.
    Status unmount(bool connection_aborted = false);
    /// Detaches the mount lazily and leaves fd() open, for while the server still runs. The
    /// connection ends (reads on fd() fail with ENODEV) when nothing uses the mount any more;
    /// files open until then (a loop device, a VM) are still served. Blocking; never from a
    /// loop thread while the server has requests out (see the definition).
    Status detach();
    [[nodiscard]] const std::string& mountpoint() const { return mountpoint_; }

  private:
    FuseMount() = default;
    enum class Here { kOnTop, kCovered, kGone, kUnknown };
    /// Where this mount is now among the mounts at mountpoint_ (kUnknown: its identity was
    /// not found right after mounting).
    [[nodiscard]] Here where_now() const;
    /// umount2(MNT_DETACH) as root, `fusermount3 -u -z` otherwise.
    Status detach_path();
    fuse_session* session_ = nullptr;
    std::string mountpoint_;
    // "ID MAJOR:MINOR" of the mount from mountinfo, "" if the table did not show it. Both
    // numbers are given again once the mount is gone, so a match says "ours" only while it is
    // known to exist.
    std::string identity_;
    bool mounted_ = false;
    // Set by detach(), which runs on an offloader thread, read by unmount() on the daemon's
    // thread once the server has ended.
    std::atomic<bool> detached_{false};
};

}  // namespace imgfs
