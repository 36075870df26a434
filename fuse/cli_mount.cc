// imgfs mount / unmount.
#include <climits>
#include <cstdio>
#include <cstdlib>

#include "fuse/cli.h"
#include "fuse/daemon.h"

namespace imgfs::cli {

namespace {

const char* kMountHelp =
    "usage: imgfs mount [-f] [-v] [-o OPTS] IMAGE_DIR MOUNTPOINT\n"
    "\n"
    "Serves every image chain in IMAGE_DIR as MOUNTPOINT/NAME.raw, with control files in\n"
    "MOUNTPOINT/.control. Runs as a daemon unless -f; unmount with 'imgfs unmount MOUNTPOINT'.\n"
    "\n"
    "  -f            stay in the foreground, log to stderr\n"
    "  -v            verbose log\n"
    "  -o OPTS       comma separated:\n"
    "     ro                      read-only\n"
    "     allow_other             let other users in (needs user_allow_other for non-root)\n"
    "     cache_size=SIZE         L2 table cache per image (default: maps 64 GiB)\n"
    "     allow_external_backing  backing files may lie outside IMAGE_DIR\n"
    "     direct                  open image files with O_DIRECT\n"
    "     max_read=N, fsname=NAME and the options mount(8) passes are accepted\n";

bool ignorable(const std::string& o) {
    static const char* kIgnored[] = {"rw",
                                     "defaults",
                                     "auto",
                                     "noauto",
                                     "user",
                                     "nouser",
                                     "users",
                                     "_netdev",
                                     "nofail",
                                     "exec",
                                     "noexec",
                                     "suid",
                                     "nosuid",
                                     "dev",
                                     "nodev",
                                     "atime",
                                     "noatime",
                                     "relatime",
                                     "default_permissions",
                                     "async",
                                     "sync",
                                     "strictatime",
                                     "nodiratime",
                                     "diratime"};
    for (const char* i : kIgnored) {
        if (o == i) {
            return true;
        }
    }
    return o.rfind("x-", 0) == 0 || o.rfind("subtype=", 0) == 0 || o.rfind("comment=", 0) == 0;
}

Status apply_option(const std::string& o, MountCommand* cmd) {
    if (o.empty() || ignorable(o)) {
        return {};
    }
    if (o == "ro") {
        cmd->mount.read_only = cmd->images.read_only = true;
    } else if (o == "allow_other") {
        cmd->mount.allow_other = true;
    } else if (o == "allow_root") {
        cmd->mount.extra.push_back("allow_root");
    } else if (o == "allow_external_backing") {
        cmd->images.allow_external_backing = true;
    } else if (o == "direct") {
        cmd->images.direct = true;
    } else if (o == "debug") {
        cmd->verbose = true;
    } else if (o.rfind("cache_size=", 0) == 0) {
        TRY_ASSIGN(uint64_t bytes, parse_size(o.substr(11)));
        cmd->images.qcow2.l2_cache_bytes = bytes;
    } else if (o.rfind("max_read=", 0) == 0) {
        TRY_ASSIGN(uint64_t bytes, parse_size(o.substr(9)));
        cmd->mount.max_read_bytes = static_cast<uint32_t>(std::min<uint64_t>(bytes, 1U << 20));
    } else if (o.rfind("fsname=", 0) == 0) {
        cmd->mount.fsname = o.substr(7);
    } else {
        return make_error(EINVAL, "unknown mount option '{}'", o);
    }
    return {};
}

std::string absolute(const std::string& p) {
    char buf[PATH_MAX];
    return ::realpath(p.c_str(), buf) != nullptr ? std::string(buf) : p;
}

}  // namespace

int mount(const Args& args) {
    MountCommand cmd;
    std::vector<std::string> positional;
    for (size_t i = 0; i < args.size(); ++i) {
        const std::string& a = args[i];
        if (a == "--help" || a == "-h") {
            std::fputs(kMountHelp, stdout);
            return 0;
        }
        if (a == "-f") {
            cmd.foreground = true;
        } else if (a == "-v" || a == "-d") {
            cmd.verbose = true;
        } else if (a == "-o" || a.rfind("-o", 0) == 0) {
            std::string opts = a == "-o" ? (i + 1 < args.size() ? args[++i] : "") : a.substr(2);
            size_t pos = 0;
            while (pos <= opts.size()) {
                size_t comma = opts.find(',', pos);
                std::string o =
                    opts.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
                if (Status st = apply_option(o, &cmd); !st) {
                    return fail(st.error().context);
                }
                if (comma == std::string::npos) {
                    break;
                }
                pos = comma + 1;
            }
        } else if (!a.empty() && a[0] == '-') {
            return fail("unknown option " + a + " (see imgfs mount --help)");
        } else {
            positional.push_back(a);
        }
    }
    if (positional.size() != 2) {
        return fail("usage: imgfs mount [-f] [-o OPTS] IMAGE_DIR MOUNTPOINT");
    }
    cmd.image_dir = absolute(positional[0]);
    cmd.mountpoint = absolute(positional[1]);
    return run_mount(cmd);
}

int unmount(const Args& args) {
    if (args.size() == 1 && (args[0] == "--help" || args[0] == "-h")) {
        std::puts(
            "usage: imgfs unmount MOUNTPOINT\n\nUnmounts and waits until the daemon has "
            "flushed and closed every image.");
        return 0;
    }
    if (args.size() != 1) {
        return fail("usage: imgfs unmount MOUNTPOINT");
    }
    return run_unmount(absolute(args[0]), 120);
}

Result<uint64_t> parse_size(const std::string& text) {
    if (text.empty()) {
        return make_error(EINVAL, "empty size");
    }
    char* end = nullptr;
    errno = 0;
    unsigned long long v = std::strtoull(text.c_str(), &end, 10);
    if (errno != 0 || end == text.c_str()) {
        return make_error(EINVAL, "invalid size '{}'", text);
    }
    std::string suffix(end);
    uint64_t mult = 1;
    if (suffix.empty() || suffix == "b" || suffix == "B") {
        mult = 1;
    } else if (suffix == "k" || suffix == "K" || suffix == "KiB") {
        mult = 1ULL << 10;
    } else if (suffix == "M" || suffix == "m" || suffix == "MiB") {
        mult = 1ULL << 20;
    } else if (suffix == "G" || suffix == "g" || suffix == "GiB") {
        mult = 1ULL << 30;
    } else if (suffix == "T" || suffix == "t" || suffix == "TiB") {
        mult = 1ULL << 40;
    } else {
        return make_error(EINVAL, "invalid size suffix in '{}'", text);
    }
    if (v > UINT64_MAX / mult) {
        return make_error(EOVERFLOW, "size '{}' is too large", text);
    }
    return static_cast<uint64_t>(v) * mult;
}

int fail(const std::string& message) {
    std::fprintf(stderr, "imgfs: %s\n", message.c_str());
    return 1;
}

}  // namespace imgfs::cli
