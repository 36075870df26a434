// mount.imgfs: the helper mount(8) runs for file system type fuse.imgfs (an /etc/fstab line or
// `mount -t fuse.imgfs`). It is installed as a link to the imgfs binary under the names mount(8)
// looks for (/sbin/mount.fuse.imgfs and /sbin/mount.imgfs), so the daemon is found without a
// shell or PATH. mount(8) calls it as
//     mount.fuse.imgfs SOURCE MOUNTPOINT [-s] [-f] [-n] [-v] [-o OPTIONS] [-t TYPE] [-N NS]
// and it runs `imgfs mount -o OPTIONS SOURCE MOUNTPOINT` (a daemon; it returns once the mount
// is up, or fails with the reason).
#include <cstdio>

#include "fuse/cli.h"

namespace imgfs::cli {

namespace {

const char* kMountHelperHelp =
    "usage: mount.imgfs IMAGE_DIR MOUNTPOINT [-o OPTS] [-t fuse.imgfs] [-s] [-f] [-n] [-v]\n"
    "\n"
    "The helper mount(8) runs for file system type fuse.imgfs, so that an /etc/fstab line\n"
    "'IMAGE_DIR MOUNTPOINT fuse.imgfs OPTS 0 0' and 'mount -t fuse.imgfs IMAGE_DIR MOUNTPOINT'\n"
    "work. It starts 'imgfs mount -o OPTS IMAGE_DIR MOUNTPOINT' and returns once the mount is\n"
    "up. OPTS are those of imgfs mount; the options only mount(8) uses (noauto, nofail,\n"
    "_netdev, x-systemd.*, ...) are ignored.\n"
    "\n"
    "  -o OPTS       mount options, comma separated (see imgfs mount --help)\n"
    "  -t TYPE       the file system type: fuse.imgfs or imgfs\n"
    "  -f            fake: mount nothing (mount -f)\n"
    "  -s, -n, -v    accepted and ignored (sloppy, no mtab, verbose)\n";

}  // namespace

int mount_helper(const Args& args) {
    std::vector<std::string> positional;
    std::string opts;
    bool fake = false;
    for (size_t i = 0; i < args.size(); ++i) {
        const std::string& a = args[i];
        if (a == "--help" || a == "-h") {
            std::fputs(kMountHelperHelp, stdout);
            return 0;
        }
        bool takes_value = a == "-o" || a == "-t" || a == "-N";
        if (takes_value && i + 1 >= args.size()) {
            return fail("mount helper: " + a + " needs a value");
        }
        if (a == "-o") {
            // mount(8) passes one -o; join several the way it would.
            opts += (opts.empty() ? "" : ",") + args[++i];
        } else if (a == "-t") {
            const std::string& type = args[++i];
            if (type != "fuse.imgfs" && type != "imgfs") {
                return fail("mount helper: file system type '" + type + "' is not fuse.imgfs");
            }
        } else if (a == "-N") {
            return fail("mount helper: mounting in another namespace (-N) is not supported");
        } else if (a == "-f") {
            fake = true;
        } else if (a == "-s" || a == "-n" || a == "-v") {
            // Sloppy, no mtab, verbose: nothing to do for a FUSE daemon.
        } else if (a.size() > 1 && a[0] == '-') {
            return fail("mount helper: unknown option " + a + " (see mount.imgfs --help)");
        } else {
            positional.push_back(a);
        }
    }
    if (positional.size() != 2) {
        return fail("usage: mount.imgfs IMAGE_DIR MOUNTPOINT [-o OPTS]");
    }
    if (fake) {
        return 0;
    }
    return mount({"-o", opts, positional[0], positional[1]});
}

}  // namespace imgfs::cli
