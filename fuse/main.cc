// imgfs: the command line. main() only dispatches; every command lives in fuse/cli_*.cc.
#include <cstdio>
#include <cstring>
#include <string>

#include <sys/stat.h>

#include "fuse/cli.h"

#ifndef IMGFS_VERSION
#define IMGFS_VERSION "unknown"
#endif

namespace {

const char* kUsage =
    "usage: imgfs COMMAND [ARGS]\n"
    "\n"
    "  mount [-f] [-v] [-o OPTS] IMAGE_DIR|rbd:POOL[/NAMESPACE] MOUNTPOINT  serve images as "
    "NAME.raw\n"
    "  unmount MOUNTPOINT                               unmount and wait for the daemon\n"
    "  snapshot MOUNTPOINT NAME SNAP                    live external snapshot\n"
    "  snapshot MOUNTPOINT --group SNAP [NAME...]       of several images at once\n"
    "  commit MOUNTPOINT NAME [--base FILE] [--wait]    merge the top layer (or all above FILE)\n"
    "  revert MOUNTPOINT NAME                           drop the top layer\n"
    "  stream MOUNTPOINT NAME [--wait]                  pull backing data into the top layer\n"
    "  job MOUNTPOINT NAME cancel|pause|resume|speed N [--wait]  control a running commit or "
    "stream\n"
    "  status MOUNTPOINT [NAME] [--json]                images, jobs, skipped files\n"
    "  create [-f qcow2] [-b BACKING [-F FMT]] [-o OPTS] FILE.qcow2 [SIZE]  new qcow2 image\n"
    "  info FILE [--json]                               chain, formats, sizes, allocation\n"
    "  io [-r] FILE -c CMD [-c CMD ...]                 scripted I/O through imgfs's drivers\n"
    "\n"
    "Run 'imgfs COMMAND --help' for a command's options, 'imgfs --version' for the version.\n";

}  // namespace

int main(int argc, char** argv) {
    // Installed as /sbin/mount.fuse.imgfs (a link to this binary), mount(8) runs it for
    // /etc/fstab lines and `mount -t fuse.imgfs`.
    const char* self = argc > 0 ? std::strrchr(argv[0], '/') : nullptr;
    self = self != nullptr ? self + 1 : (argc > 0 ? argv[0] : "");
    if (std::strncmp(self, "mount.", 6) == 0) {
        return imgfs::cli::mount_helper(imgfs::cli::Args(argv + 1, argv + argc));
    }
    if (argc == 2 && (std::strcmp(argv[1], "--version") == 0 || std::strcmp(argv[1], "-V") == 0)) {
        std::puts("imgfs " IMGFS_VERSION);
        return 0;
    }
    if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0) {
        std::fputs(kUsage, argc < 2 ? stderr : stdout);
        return argc < 2 ? 1 : 0;
    }
    std::string cmd = argv[1];
    imgfs::cli::Args args(argv + 2, argv + argc);
    if (cmd == "mount") {
        return imgfs::cli::mount(args);
    }
    if (cmd == "unmount" || cmd == "umount") {
        return imgfs::cli::unmount(args);
    }
    if (cmd == "create") {
        return imgfs::cli::create(args);
    }
    if (cmd == "info") {
        return imgfs::cli::info(args);
    }
    if (cmd == "io") {
        return imgfs::cli::io(args);
    }
    if (cmd == "snapshot") {
        return imgfs::cli::snapshot(args);
    }
    if (cmd == "commit") {
        return imgfs::cli::commit(args);
    }
    if (cmd == "revert") {
        return imgfs::cli::revert(args);
    }
    if (cmd == "stream") {
        return imgfs::cli::stream(args);
    }
    if (cmd == "job") {
        return imgfs::cli::job(args);
    }
    if (cmd == "status") {
        return imgfs::cli::status(args);
    }
    struct stat st {};
    const bool image_dir =
        cmd.rfind("rbd:", 0) == 0 || (::stat(cmd.c_str(), &st) == 0 && S_ISDIR(st.st_mode));
    if (argc >= 3 && image_dir) {
        // mount.fuse3 (fstab type fuse.imgfs) runs: imgfs IMAGE_DIR MOUNTPOINT -o OPTS. Only
        // for an image directory, so that a mistyped command is not taken for one.
        imgfs::cli::Args all(argv + 1, argv + argc);
        return imgfs::cli::mount(all);
    }
    std::fprintf(stderr, "imgfs: unknown command '%s' (see imgfs --help)\n", cmd.c_str());
    return 1;
}
