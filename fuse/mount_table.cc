#include "fuse/mount_table.h"

#include <climits>
#include <cstdlib>
#include <dirent.h>
#include <fstream>
#include <sstream>
#include <unistd.h>

#include <fmt/format.h>

namespace imgfs {

namespace {

std::string unescape(const std::string& field) {
    std::string out;
    for (size_t i = 0; i < field.size(); ++i) {
        if (field[i] == '\\' && i + 3 < field.size() && field[i + 1] >= '0' &&
            field[i + 1] <= '3') {
            out += static_cast<char>((field[i + 1] - '0') * 64 + (field[i + 2] - '0') * 8 +
                                     (field[i + 3] - '0'));
            i += 3;
        } else {
            out += field[i];
        }
    }
    return out;
}

std::string resolved(const std::string& path) {
    char buf[PATH_MAX];
    return ::realpath(path.c_str(), buf) != nullptr ? std::string(buf) : path;
}

std::string read_link(const std::string& path) {
    char buf[PATH_MAX];
    ssize_t n = ::readlink(path.c_str(), buf, sizeof buf - 1);
    return n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string();
}

std::vector<std::string> list_dir(const std::string& path) {
    std::vector<std::string> names;
    if (DIR* d = ::opendir(path.c_str())) {
        while (dirent* ent = ::readdir(d)) {
            if (ent->d_name[0] != '.') {
                names.emplace_back(ent->d_name);
            }
        }
        ::closedir(d);
    }
    return names;
}

// "vm.raw" for a path under the mount point, "" for a path elsewhere.
std::string under(const std::string& path, const std::string& mountpoint) {
    if (path.size() > mountpoint.size() && path.compare(0, mountpoint.size(), mountpoint) == 0 &&
        path[mountpoint.size()] == '/') {
        return path.substr(mountpoint.size() + 1);
    }
    return path == mountpoint ? std::string(".") : std::string();
}

void loop_users(const std::string& mnt, std::vector<std::string>* out) {
    for (const std::string& dev : list_dir("/sys/block")) {
        if (dev.rfind("loop", 0) != 0) {
            continue;
        }
        std::ifstream f("/sys/block/" + dev + "/loop/backing_file");
        std::string backing;
        std::getline(f, backing);
        if (std::string rel = under(backing, mnt); !rel.empty()) {
            out->push_back(fmt::format("loop device /dev/{} is attached to {} (losetup -d /dev/{})",
                                       dev, rel, dev));
        }
    }
}

void process_users(const std::string& mnt, std::vector<std::string>* out) {
    for (const std::string& pid : list_dir("/proc")) {
        if (pid.find_first_not_of("0123456789") != std::string::npos ||
            pid == std::to_string(::getpid())) {
            continue;
        }
        std::ifstream comm_file("/proc/" + pid + "/comm");
        std::string comm;
        std::getline(comm_file, comm);
        std::vector<std::string> files;
        if (std::string rel = under(read_link("/proc/" + pid + "/cwd"), mnt); !rel.empty()) {
            files.push_back("its working directory " + rel);
        }
        for (const std::string& fd : list_dir("/proc/" + pid + "/fd")) {
            if (std::string rel = under(read_link("/proc/" + pid + "/fd/" + fd), mnt);
                !rel.empty()) {
                files.push_back(rel);
            }
        }
        if (!files.empty()) {
            std::string list;
            for (const auto& f : files) {
                list += list.empty() ? f : ", " + f;
            }
            out->push_back(fmt::format("process {} ({}) has {} open", pid, comm, list));
        }
    }
}

}  // namespace

std::vector<MountEntry> read_mount_table() {
    std::vector<MountEntry> out;
    std::ifstream f("/proc/self/mounts");
    for (std::string line; std::getline(f, line);) {
        std::istringstream words(line);
        MountEntry e;
        std::string options;
        words >> e.source >> e.target >> e.type >> options;
        e.source = unescape(e.source);
        e.target = unescape(e.target);
        std::istringstream opts(options);
        for (std::string opt; std::getline(opts, opt, ',');) {
            if (opt.rfind("user_id=", 0) == 0) {
                e.owner = static_cast<uint32_t>(std::strtoul(opt.c_str() + 8, nullptr, 10));
            }
        }
        out.push_back(std::move(e));
    }
    return out;
}

std::optional<MountEntry> imgfs_mount_at(const std::string& path) {
    std::string want = resolved(path);
    std::optional<MountEntry> found;
    for (const MountEntry& e : read_mount_table()) {
        if (e.target == want) {
            // The last entry for a mount point is the one on top.
            found = e.type == "fuse.imgfs" ? std::optional<MountEntry>(e) : std::nullopt;
        }
    }
    return found;
}

std::vector<std::string> mounts_at(const std::string& target) {
    // mountinfo: ID PARENT MAJOR:MINOR ROOT MOUNTPOINT ...; later entries are on top.
    std::ifstream f("/proc/self/mountinfo");
    std::vector<std::string> found;
    for (std::string line; std::getline(f, line);) {
        std::istringstream words(line);
        std::string id, parent, device, root, mountpoint;
        words >> id >> parent >> device >> root >> mountpoint;
        if (unescape(mountpoint) == target) {
            found.push_back(id + " " + device);
        }
    }
    return found;
}

std::vector<std::string> mount_users(const std::string& mountpoint) {
    std::vector<std::string> out;
    std::string mnt = resolved(mountpoint);
    loop_users(mnt, &out);
    process_users(mnt, &out);
    return out;
}

}  // namespace imgfs
