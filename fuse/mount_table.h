// The kernel's mount table as the command line needs it: is a path an imgfs mount, which mount
// serves an image directory, and what keeps a mount busy. Blocking (reads /proc and /sys); for
// the command line and the daemon's start-up only, never the event loop.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace imgfs {

struct MountEntry {
    std::string source;             // for imgfs: the image directory (fsname)
    std::string target;             // the mount point
    std::string type;               // "fuse.imgfs" for ours
    std::optional<uint32_t> owner;  // a FUSE mount's user_id=: the uid that mounted it
};

/// /proc/self/mounts, with its octal escapes (\040 for a space) undone.
std::vector<MountEntry> read_mount_table();
/// The imgfs mount whose mount point is `path` (compared after resolving symlinks), if any.
std::optional<MountEntry> imgfs_mount_at(const std::string& path);
/// The mounts at `target`, exactly as written (nothing is resolved: the path may be a FUSE
/// mount that no longer answers), bottom first, each as "ID MAJOR:MINOR" from mountinfo.
std::vector<std::string> mounts_at(const std::string& target);
/// What holds files under `mountpoint` open: loop devices backed by them and processes with
/// one open (or their working directory there), one description each.
std::vector<std::string> mount_users(const std::string& mountpoint);

}  // namespace imgfs
