// FuseMount: mounting and unmounting through libfuse (which knows how to do it as root and, via
// fusermount3, as a user). libfuse is used for nothing else: requests are read from the /dev/fuse
// descriptor by FuseServer through the event loop.
#pragma once

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
    /// Detaches the mount; outstanding reads on fd() then fail with ENODEV.
    void unmount();
    [[nodiscard]] const std::string& mountpoint() const { return mountpoint_; }

  private:
    FuseMount() = default;
    fuse_session* session_ = nullptr;
    std::string mountpoint_;
    bool mounted_ = false;
};

}  // namespace imgfs
