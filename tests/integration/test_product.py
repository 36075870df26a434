#!/usr/bin/env python3
"""The edges a user meets first: status of skipped and damaged images, mount safety, what keeps
an unmount from happening, dd onto NAME.raw without conv=notrunc, and the job command line."""

import errno
import json
import mmap
import os
import shlex
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
import unittest

import harness
from harness import run, qemu_img

MiB = 1 << 20


def read_control(m, name, file):
    with open(m.path(".control", name, file) if name else m.path(".control", file)) as f:
        return f.read()


def job(m, name):
    text = read_control(m, name, "job")
    return json.loads(text) if text.strip() else None


def chain(m, name):
    return read_control(m, name, "snapshot").split()


class Status(harness.ImageDirTest):
    def test_skipped_and_damaged_images_are_listed_with_their_reason(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("good.qcow2"), "16M")
        # A backing file outside the directory.
        outside = tempfile.mkdtemp(prefix="imgfs-outside-")
        self.addCleanup(lambda: run(["rm", "-rf", outside]))
        qemu_img("create", "-q", "-f", "qcow2", os.path.join(outside, "base.qcow2"), "16M")
        qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                 os.path.join(outside, "base.qcow2"), self.img("escapes.qcow2"))
        # Two roots that want the same export name.
        qemu_img("create", "-q", "-f", "qcow2", self.img("twin.qcow2"), "16M")
        qemu_img("create", "-q", "-f", "qcow2", self.img("twin@other.qcow2"), "16M")
        # A header that cannot be read.
        with open(self.img("broken.qcow2"), "wb") as f:
            f.write(b"QFI\xfb" + struct.pack(">I", 3) + b"\xff" * 200)
        # An image QEMU holds: its lock.
        qemu_img("create", "-q", "-f", "qcow2", self.img("held.qcow2"), "16M")
        holder = subprocess.Popen(["qemu-io", "-f", "qcow2", self.img("held.qcow2")],
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        self.addCleanup(holder.kill)
        # Until qemu-io holds its locks, as /proc/locks shows them: a probe that opens the image
        # (qemu-img info) would take a lock of its own, and could make qemu-io's open fail.
        inode = os.stat(self.img("held.qcow2")).st_ino
        deadline = time.time() + 30
        while time.time() < deadline and not harness.ofd_locked(inode):
            time.sleep(0.05)
        self.assertTrue(harness.ofd_locked(inode), "qemu-io did not lock held.qcow2")
        # An image marked corrupt on disk is not served (a repair comes first).
        qemu_img("create", "-q", "-f", "qcow2", self.img("marked.qcow2"), "16M")
        with open(self.img("marked.qcow2"), "r+b") as f:
            f.seek(72)
            incompat = struct.unpack(">Q", f.read(8))[0]
            f.seek(72)
            f.write(struct.pack(">Q", incompat | 2))
        # One whose damage shows only when it is read: served, then flagged.
        qemu_img("create", "-q", "-f", "qcow2", self.img("damaged.qcow2"), "16M")
        harness.qemu_io(self.img("damaged.qcow2"), "write -P 7 0 64k")
        with open(self.img("damaged.qcow2"), "r+b") as f:
            f.seek(40)
            l1 = struct.unpack(">Q", f.read(8))[0]
            f.seek(l1)
            l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
            f.seek(l2)
            entry = struct.unpack(">Q", f.read(8))[0]
            f.seek(l2)
            f.write(struct.pack(">Q", entry | 0x200))  # a host offset off the cluster grid
        m = self.mount()
        self.assertEqual(m.exports(), ["damaged", "good"])
        skipped = [json.loads(l) for l in read_control(m, None, "skipped").splitlines()]
        files = {s["file"]: s["reason"] for s in skipped}
        self.assertEqual(sorted(files), ["broken.qcow2", "escapes.qcow2", "held.qcow2",
                                         "marked.qcow2", "twin.qcow2", "twin@other.qcow2"],
                         skipped)
        self.assertIn("corrupt", files["marked.qcow2"])
        self.assertIn("outside", files["escapes.qcow2"])
        self.assertIn("wanted by", files["twin.qcow2"])
        self.assertIn("in use", files["held.qcow2"])
        with open(m.path("damaged.raw"), "rb") as f:
            with self.assertRaises(OSError):
                f.read(4096)
        human = run([harness.IMGFS, "status", m.mountpoint]).stdout
        self.assertIn("skipped:", human)
        for f, reason in files.items():
            self.assertIn(f"  {f}: {reason}", human)
        lines = {l.split()[0]: l for l in human.splitlines() if l.endswith(".raw") or ".raw " in l}
        self.assertIn("CORRUPT", lines["damaged.raw"])
        self.assertNotIn("CORRUPT", lines["good.raw"])
        st = json.loads(run([harness.IMGFS, "status", m.mountpoint, "--json"]).stdout)
        self.assertEqual([i["name"] for i in st["images"]], ["damaged", "good"])
        self.assertEqual(sorted(s["file"] for s in st["skipped"]), sorted(files))
        # Once QEMU lets go, a rescan exports it and the list forgets it.
        holder.kill()
        holder.wait()
        with open(m.path(".control", "rescan"), "w") as f:
            f.write("\n")
        self.assertIn("held", m.exports())
        self.assertNotIn("held.qcow2", read_control(m, None, "skipped"))
        m.stop()

    def test_status_of_a_path_that_is_not_a_mount_fails(self):
        for path in (self.dir, "/nonexistent/imgfs"):
            p = run([harness.IMGFS, "status", path], check=False)
            self.assertNotEqual(p.returncode, 0)
            self.assertIn("is not an imgfs mount", p.stderr)
        p = run([harness.IMGFS, "snapshot", self.dir, "vm", "s1"], check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("is not an imgfs mount", p.stderr)
        # A mistyped command is not taken for an fstab-style mount.
        for argv in (["stauts", self.dir], ["unmout", self.dir, "--json"]):
            p = run([harness.IMGFS, *argv], check=False)
            self.assertNotEqual(p.returncode, 0)
            self.assertIn(f"unknown command '{argv[0]}'", p.stderr)

    def test_status_of_a_mount_whose_daemon_died_fails(self):
        # A monitor must not read a dead daemon as a healthy mount without images.
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "1M")
        m = self.mount()
        p = run([harness.IMGFS, "status", m.mountpoint], check=False)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("transport:", p.stdout)
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait()
        p = run([harness.IMGFS, "status", m.mountpoint], check=False)
        self.assertNotEqual(p.returncode, 0, p.stdout)
        self.assertIn("its daemon is gone", p.stderr)
        p = run([harness.IMGFS, "status", m.mountpoint, "--json"], check=False)
        self.assertNotEqual(p.returncode, 0, p.stdout)
        m.proc = None
        run(["umount", "-l", m.mountpoint], check=False)


class MountSafety(harness.ImageDirTest):
    def test_a_directory_served_twice_or_a_mount_on_a_mount_is_refused(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "16M")
        m = self.mount()
        other = tempfile.mkdtemp(prefix="imgfs-mnt-")
        self.addCleanup(lambda: os.rmdir(other))
        p = run([harness.IMGFS, "mount", self.dir, other], check=False, timeout=30)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("already served by another imgfs mount", p.stderr)
        self.assertIn(m.mountpoint, p.stderr)
        self.assertFalse(harness.is_mounted(other))
        second = tempfile.mkdtemp(prefix="imgfs-it-")
        self.addCleanup(lambda: run(["rm", "-rf", second]))
        p = run([harness.IMGFS, "mount", second, m.mountpoint], check=False, timeout=30)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("is already an imgfs mount", p.stderr)
        self.assertEqual(m.exports(), ["vm"])  # the first mount still shows its images
        m.stop()
        # Once unmounted, the directory can be mounted again.
        m = self.mount()
        self.assertEqual(m.exports(), ["vm"])
        m.stop()

    def test_a_directory_whose_path_has_a_comma_or_a_backslash_is_served(self):
        # The directory's path becomes the mount's source (fsname), inside the comma-separated
        # mount options: "a,b" made libfuse refuse the mount ("cannot set up a FUSE session").
        parent = tempfile.mkdtemp(prefix="imgfs-it-")
        self.addCleanup(lambda: run(["rm", "-rf", parent]))
        for name in ("images,one", "images\\two"):
            directory = os.path.join(parent, name)
            os.mkdir(directory)
            qemu_img("create", "-q", "-f", "qcow2", os.path.join(directory, "vm.qcow2"), "16M")
            m = harness.Mount(directory)
            self.mounts.append(m)
            m.start()
            self.assertEqual(m.exports(), ["vm"])
            with open("/proc/self/mountinfo") as f:
                sources = [line.split(" - ")[1].split()[1] for line in f
                           if line.split()[4] == m.mountpoint]
            self.assertEqual(sources, [directory.replace("\\", "\\134")], name)
            with open(m.path("vm.raw"), "r+b") as f:
                f.write(b"\x5a" * 4096)
            m.stop()

    def test_unmount_of_a_busy_mount_names_what_holds_it(self):
        harness.require_tools("losetup")
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "16M")
        m = self.mount()
        reader = subprocess.Popen(["python3", "-c", "import sys,time; f=open(sys.argv[1],'rb'); "
                                   "time.sleep(60)", m.path("vm.raw")])
        self.addCleanup(reader.kill)
        time.sleep(0.5)
        loop = run(["losetup", "-f", "--show", m.path("vm.raw")]).stdout.strip()
        self.addCleanup(lambda: run(["losetup", "-d", loop], check=False))
        p = run([harness.IMGFS, "unmount", m.mountpoint], check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("busy", p.stderr)
        self.assertIn(f"loop device {loop} is attached to vm.raw", p.stderr)
        self.assertIn(f"process {reader.pid} (python3) has vm.raw open", p.stderr)
        run(["losetup", "-d", loop])
        reader.kill()
        reader.wait()
        m.stop()
        p = run([harness.IMGFS, "unmount", m.mountpoint], check=False)
        self.assertIn("is not an imgfs mount", p.stderr)


    def test_unmount_after_the_daemon_was_killed_says_so(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "16M")
        m = self.mount()
        m.proc.kill()
        m.proc.wait()
        p = run([harness.IMGFS, "unmount", m.mountpoint], check=False)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn("its daemon had already exited", p.stderr)
        self.assertFalse(harness.is_mounted(m.mountpoint))
        m.kill(running=False)  # the bookkeeping of a killed daemon; nothing is left to detach
        qemu_img("check", "-q", self.img("vm.qcow2"))

    def test_a_mount_started_with_its_standard_descriptors_closed_works(self):
        # Started from a context that closed 0-2 (a service manager, a shell that exited), the
        # daemon's first files took those numbers: in the background, its dup2 of /dev/null
        # closed the pipe that says "mounted", so the command reported a failure while the
        # daemon mounted; in the foreground, log lines went into an eventfd.
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "16M")
        mnt = tempfile.mkdtemp(prefix="imgfs-mnt-")

        def unmount():
            if harness.is_mounted(mnt):
                run([harness.IMGFS, "unmount", mnt], check=False)
            os.rmdir(mnt)

        self.addCleanup(unmount)
        p = subprocess.run(["sh", "-c", 'exec "$0" mount "$1" "$2" <&- >&- 2>&-', harness.IMGFS,
                            self.dir, mnt], timeout=60)
        self.assertEqual(p.returncode, 0)
        self.assertTrue(harness.is_mounted(mnt))
        with open(os.path.join(mnt, "vm.raw"), "r+b") as f:
            f.write(b"x" * 4096)
            os.fsync(f.fileno())
        run([harness.IMGFS, "unmount", mnt])
        qemu_img("check", "-q", self.img("vm.qcow2"))

    def test_a_signal_never_detaches_a_mount_that_covers_ours(self):
        # SIGTERM detaches the mount by its path, which acts on the mount on top: with another
        # mount over ours that one would go. The daemon says why it cannot and serves on.
        harness.require_root()
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "16M")
        m = self.mount()
        run(["mount", "-t", "tmpfs", "-o", "size=1M", "cover", m.mountpoint])
        try:
            m.proc.send_signal(signal.SIGTERM)
            deadline = time.time() + 30
            while "another mount covers it" not in m.read_log() and time.time() < deadline:
                time.sleep(0.05)
            self.assertIn("another mount covers it", m.read_log())
            with open("/proc/self/mounts") as f:
                types = [l.split()[2] for l in f if l.split()[1] == m.mountpoint]
            self.assertEqual(types, ["fuse.imgfs", "tmpfs"])
            self.assertIsNone(m.proc.poll())
        finally:
            run(["umount", m.mountpoint])
        self.assertTrue(os.path.exists(m.path("vm.raw")))
        m.stop()

    def test_an_aborted_connection_is_detached_and_reported(self):
        # `echo 1 > /sys/fs/fuse/connections/N/abort`, an operator's way out of a hung mount.
        # The requests in flight fail; the daemon exits 1 with the reason, detaches the dead
        # mount (which answered ENOTCONN and refused a new mount until unmounted by hand) and
        # leaves the reason for `imgfs unmount`. What fsync acknowledged stays.
        harness.require_root()  # fusectl's abort file
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "16M")
        conns = "/sys/fs/fuse/connections"
        if not os.path.ismount(conns):
            run(["mount", "-t", "fusectl", "none", conns])
        m = self.mount()
        raw = m.path("vm.raw")
        kept = os.urandom(1 << 20)
        with open(raw, "r+b") as f:
            f.write(kept)
            os.fsync(f.fileno())
        connection = os.minor(os.stat(m.mountpoint).st_dev)
        errors = []

        def writer():
            fd = os.open(raw, os.O_WRONLY)
            try:
                for i in range(100000):
                    os.pwrite(fd, b"w" * 65536, (1 << 20) + (i % 64) * 65536)
            except OSError as e:
                errors.append(e.errno)
            try:
                os.close(fd)  # its flush fails too
            except OSError:
                pass

        t = threading.Thread(target=writer)
        t.start()
        time.sleep(0.3)
        with open(f"{conns}/{connection}/abort", "w") as f:
            f.write("1")
        t.join(timeout=30)
        self.assertFalse(t.is_alive())
        # In flight at the abort, or sent after it.
        self.assertEqual(len(errors), 1)
        self.assertIn(errors[0], (errno.ECONNABORTED, errno.ENOTCONN))
        code = m.wait_exit(30)
        self.assertEqual(code, 1, m.read_log()[-2000:])
        self.assertIn("the FUSE connection was aborted", m.read_log())
        self.assertFalse(harness.is_mounted(m.mountpoint))
        p = run([harness.IMGFS, "unmount", m.mountpoint], check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("its daemon ended: the FUSE connection was aborted", p.stderr)
        qemu_img("check", "-q", self.img("vm.qcow2"))
        again = self.mount(mountpoint=m.mountpoint)
        with open(again.path("vm.raw"), "rb") as f:
            self.assertEqual(f.read(len(kept)), kept)
        again.stop()


class RawFile(harness.ImageDirTest):
    def test_times_move_with_writes_and_take_what_is_set(self):
        # rsync's default check and backups that go by mtime must see a changed disk, whose
        # size never changes.
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "16M")
        m = self.mount()
        raw = m.path("vm.raw")
        before = os.stat(raw)
        time.sleep(0.05)
        with open(raw, "r+b") as f:
            f.write(b"x" * 4096)
        after = os.stat(raw)
        self.assertGreater(after.st_mtime_ns, before.st_mtime_ns)
        self.assertGreater(after.st_ctime_ns, before.st_ctime_ns)
        os.utime(raw, ns=(946684800 * 10**9, 946684800 * 10**9))  # touch -d 2000-01-01
        self.assertEqual(os.stat(raw).st_mtime_ns, 946684800 * 10**9)
        run(["touch", raw])
        self.assertGreater(os.stat(raw).st_mtime_ns, after.st_mtime_ns)
        # The mode may be set to what it is (cp -p, install -m), not changed.
        os.chmod(raw, 0o600)
        with self.assertRaises(PermissionError):
            os.chmod(raw, 0o644)
        m.stop()

    def test_cp_of_a_sparse_image_onto_a_written_disk_copies_it_whole(self):
        # O_TRUNC is ignored, as a disk ignores it. cp's default (--sparse=auto) skips a sparse
        # source's holes by seeking, in a file it takes for emptied, and leaves the old bytes
        # there (documented); the two ways the README gives copy the image whole.
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "4M")
        m = self.mount()
        with open(m.path("vm.raw"), "r+b") as f:
            f.write(b"\x77" * (4 * MiB))
        src = self.img("src.img")
        with open(src, "wb") as f:
            f.write(b"hello")
            f.truncate(4 * MiB)
        for sparse in ("--sparse=always", "--sparse=never"):
            run(["cp", sparse, src, m.path("vm.raw")])
            with open(m.path("vm.raw"), "rb") as f, open(src, "rb") as g:
                self.assertTrue(f.read() == g.read(), sparse)
        m.stop()

    def test_control_files_report_the_size_a_read_returns(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "16M")
        m = self.mount()
        for f in (m.path(".control", "vm", "info"), m.path(".control", "vm", "snapshot")):
            with open(f, "rb") as h:
                content = h.read()
                self.assertEqual(os.fstat(h.fileno()).st_size, len(content), f)
            self.assertGreater(os.stat(f).st_size, 0, f)
            # sendfile (splice) stops at the size the kernel has.
            copy = self.img("copy")
            shutil.copyfile(f, copy)
            with open(copy, "rb") as h:
                self.assertTrue(h.read().startswith(content[:20]), f)
        m.stop()

    def test_dd_without_notrunc_writes_in_place(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "16M")
        m = self.mount()
        with open(m.path("vm.raw"), "r+b") as f:
            f.seek(8 * MiB)
            f.write(b"kept" * 1024)
        data = os.urandom(MiB)
        src = self.img("src.bin")
        with open(src, "wb") as f:
            f.write(data)
        run(["dd", f"if={src}", f"of={m.path('vm.raw')}", "bs=64k", "status=none"])
        run(["bash", "-c", f"cat {src} > {m.path('vm.raw')}"])  # the shell's O_TRUNC too
        self.assertEqual(os.path.getsize(m.path("vm.raw")), 16 * MiB)
        with open(m.path("vm.raw"), "rb") as f:
            self.assertEqual(f.read(MiB), data)
            f.seek(8 * MiB)
            self.assertEqual(f.read(4096), b"kept" * 1024)
        # Shrinking is still refused: a disk does not get smaller.
        p = run(["truncate", "-s", "1M", m.path("vm.raw")], check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertEqual(os.path.getsize(m.path("vm.raw")), 16 * MiB)
        m.stop()
        self.assertEqual(harness.check(self.img("vm.qcow2"))["exit"], 0)

    def test_an_o_trunc_open_does_not_hide_the_disk_from_a_direct_io_loop_device(self):
        # O_TRUNC on NAME.raw is ignored; but the kernel, told the daemon truncates at open
        # (FUSE_ATOMIC_O_TRUNC), took the file for emptied until its next getattr, and a loop
        # device in direct-I/O mode (asynchronous reads) got I/O errors past offset 0.
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "16M")
        harness.qemu_io(self.img("vm.qcow2"), "write -P 7 0 16M")
        m = self.mount()
        dev = run(["losetup", "--direct-io=on", "--show", "-f", m.path("vm.raw")]).stdout.strip()
        try:
            os.close(os.open(m.path("vm.raw"), os.O_WRONLY | os.O_TRUNC))
            fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
            try:
                buf = mmap.mmap(-1, 4096)
                self.assertEqual(os.preadv(fd, [buf], 8 * MiB), 4096)
                self.assertEqual(bytes(buf), b"\x07" * 4096)
            finally:
                os.close(fd)
        finally:
            run(["losetup", "-d", dev], check=False)
        self.assertEqual(os.path.getsize(m.path("vm.raw")), 16 * MiB)
        m.stop()


class ManyImages(harness.ImageDirTest):
    def test_more_layers_than_the_soft_descriptor_limit(self):
        # A layer takes a descriptor, and a second one once a read misses the page cache
        # (O_DIRECT). Started with a soft limit of 64, the daemon raises it to the hard one
        # and serves 60 images read cold, each with its own bytes.
        harness.require_tools("prlimit")
        count = 60
        for i in range(count):
            path = self.img(f"vm{i}.qcow2")
            qemu_img("create", "-q", "-f", "qcow2", path, "1M")
            harness.qemu_io(path, f"write -P {i + 1} 0 1M")
        m = self.mount(wrapper=["prlimit", "--nofile=64:8192", "--"])
        with open(f"/proc/{m.proc.pid}/limits") as f:
            line = next(l for l in f if l.startswith("Max open files"))
        self.assertEqual(line.split()[3:5], ["8192", "8192"], line)
        run("sync; echo 1 > /proc/sys/vm/drop_caches")
        for i in range(count):
            with open(m.path(f"vm{i}.raw"), "rb") as f:
                self.assertTrue(f.read() == bytes([i + 1]) * MiB, f"vm{i}.raw")
        m.stop()


    def test_more_layers_than_the_hard_descriptor_limit(self):
        # With a hard limit of 64 and 80 images, the start-up scan used to take every
        # descriptor, and the mount then failed with "is /dev/fuse usable?". Now the images
        # that fit are served, and .control/skipped names the others and why.
        harness.require_tools("prlimit")
        count = 80
        for i in range(count):
            qemu_img("create", "-q", "-f", "qcow2", self.img(f"vm{i:02}.qcow2"), "1M")
        m = self.mount(wrapper=["prlimit", "--nofile=64:64", "--"])
        served = [n for n in os.listdir(m.mountpoint) if n.endswith(".raw")]
        self.assertGreater(len(served), 10)
        self.assertLess(len(served), count)
        with open(m.path(".control", "skipped")) as f:
            skipped = f.read()
        missing = sorted(set(f"vm{i:02}.raw" for i in range(count)) - set(served))
        for name in missing:
            self.assertIn(name[:-4] + ".qcow2", skipped)
        self.assertIn("Too many open files", skipped)
        with open(m.path(sorted(served)[0]), "r+b") as f:
            f.write(b"x" * 65536)
            os.fsync(f.fileno())
        m.stop()

class FileSizeLimit(harness.ImageDirTest):
    def test_a_write_past_the_file_size_limit_fails_and_the_daemon_stays(self):
        # Started under `ulimit -f` (systemd: LimitFSIZE=), the daemon grows an image past the
        # limit. The kernel refuses that write with SIGXFSZ to the writing thread, and small
        # writes are made on the daemon's own thread: the write must fail with an error and the
        # daemon live on, never die of the signal.
        harness.require_tools("prlimit")
        limit = 2 * MiB
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "16M")
        m = self.mount(wrapper=["prlimit", f"--fsize={limit}", "--"])
        first = os.urandom(64 * 1024)
        failed = None
        fd = os.open(m.path("vm.raw"), os.O_RDWR | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 4096)
            for off in range(0, 8 * MiB, 4096):
                buf.seek(0)
                buf.write(first[off % len(first):][:4096].ljust(4096, b"\0"))
                try:
                    os.pwrite(fd, buf, off)
                except OSError as e:
                    failed = (off, e.errno)
                    break
        finally:
            os.close(fd)
        self.assertIsNotNone(failed, "every write succeeded: the image never reached the limit")
        self.assertIn(failed[1], (errno.EFBIG, errno.EIO, errno.ENOSPC), failed)
        self.assertLess(failed[0], 4 * MiB, failed)
        time.sleep(0.5)
        self.assertIsNone(m.proc.poll(), "the daemon died at the file size limit")
        status = run([harness.IMGFS, "status", m.mountpoint]).stdout
        self.assertIn("vm", status)
        with open(m.path("vm.raw"), "rb") as f:
            self.assertEqual(f.read(len(first)), first)
        m.stop()
        self.assertLessEqual(os.path.getsize(self.img("vm.qcow2")), limit)
        c = harness.check(self.img("vm.qcow2"))
        self.assertEqual((c["corruptions"], c["check-errors"]), (0, 0), c["text"])


class CephLibraries(harness.ImageDirTest):
    """The Ceph client libraries are loaded when a pool is opened, not when the daemon starts:
    a mount of a directory must not carry them, and a host without them gets a clear error."""

    def test_a_directory_mount_does_not_load_them(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "16M")
        m = self.mount()
        with open(m.path("vm.raw"), "rb") as f:
            f.read(4096)
        with open(f"/proc/{m.proc.pid}/maps") as f:
            maps = f.read()
        loaded = [lib for lib in ("librbd", "librados", "libceph-common") if lib in maps]
        self.assertEqual(loaded, [])
        m.stop()

    def run_without(self, soname, argv):
        """Runs `argv` in a mount namespace of its own in which every copy of library `soname`
        that ldconfig knows of is unreadable (an empty file bound over it)."""
        paths = [l.split("=>")[-1].strip() for l in run(["ldconfig", "-p"]).stdout.splitlines()
                 if l.strip().startswith(soname + " ")]
        self.assertTrue(paths or not os.environ.get("CI"), f"no {soname} on this CI host")
        script = "".join(f"mount --bind /dev/null {shlex.quote(p)} && " for p in paths)
        script += " ".join(shlex.quote(a) for a in argv)
        return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True,
                              text=True, timeout=60)

    def test_a_pool_without_them_is_a_clear_error(self):
        # The pool is refused naming the Debian packages, and nothing crashes; either library
        # missing.
        harness.require_tools("unshare", "ldconfig")
        mnt = tempfile.mkdtemp(prefix="imgfs-it-mnt-")
        self.addCleanup(os.rmdir, mnt)
        for soname in ("librbd.so.1", "librados.so.2"):
            p = self.run_without(soname, [harness.IMGFS, "info", "rbd:rbd/vm.qcow2"])
            self.assertEqual(p.returncode, 1, f"{soname}: {p.stderr}")
            self.assertIn("Ceph pools need the Ceph client libraries", p.stderr, soname)
            self.assertIn("librados2 and librbd1", p.stderr, soname)
            p = self.run_without(soname, [harness.IMGFS, "mount", "-f", "rbd:rbd", mnt])
            self.assertNotEqual(p.returncode, 0, f"{soname}: {p.stderr}")
            self.assertIn("librbd1", p.stderr, soname)


class JobCli(harness.ImageDirTest):
    def start_slow_commit(self, m):
        with open(m.path("vm.raw"), "r+b") as f:
            for off in range(0, 64 * MiB, 4 * MiB):
                f.write(os.urandom(4 * MiB))
        # Started and throttled through the control files, microseconds apart: two CLI runs
        # (each loading Ceph's libraries, slower under ASan) could let the 64 MiB commit finish
        # before the throttle lands. The tests below drive the job through the CLI.
        for file, command in (("commit", b"\n"), ("job", b"speed 1048576\n")):
            fd = os.open(m.path(".control", "vm", file), os.O_WRONLY)
            try:
                os.write(fd, command)
            finally:
                os.close(fd)

    def setUp(self):
        super().setUp()
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "64M")
        self.m = self.mount()
        run([harness.IMGFS, "snapshot", self.m.mountpoint, "vm", "s1"])

    def test_pause_resume_speed_and_wait_attaches(self):
        m = self.m
        self.start_slow_commit(m)
        run([harness.IMGFS, "job", m.mountpoint, "vm", "pause"])
        self.assertEqual(job(m, "vm")["state"], "paused")
        # Growing the disk conflicts with the job: EBUSY, as for any conflicting job.
        with self.assertRaises(OSError) as cm:
            os.truncate(m.path("vm.raw"), 128 * MiB)
        self.assertEqual(cm.exception.errno, errno.EBUSY)
        self.assertEqual(os.path.getsize(m.path("vm.raw")), 64 * MiB)
        self.assertIn("commit paused", run([harness.IMGFS, "status", m.mountpoint]).stdout)
        run([harness.IMGFS, "job", m.mountpoint, "vm", "resume"])
        self.assertEqual(job(m, "vm")["state"], "running")
        status = run([harness.IMGFS, "status", m.mountpoint]).stdout
        self.assertRegex(status, r"job commit running \d+%")
        run([harness.IMGFS, "job", m.mountpoint, "vm", "speed", "0"])
        # --wait follows the commit already under way instead of failing.
        p = run([harness.IMGFS, "commit", m.mountpoint, "vm", "--wait"])
        self.assertIn("already under way; following it", p.stderr)
        self.assertEqual(job(m, "vm")["state"], "concluded")
        self.assertIsNone(job(m, "vm")["error"])
        # Attaching sent no command, so no refusal is left behind as the last error.
        info = json.loads(read_control(m, "vm", "info"))
        self.assertFalse(info.get("last_error"), info)
        for bad in (["explode"], ["speed"], ["speed", "fast"], []):
            p = run([harness.IMGFS, "job", m.mountpoint, "vm", *bad], check=False)
            self.assertNotEqual(p.returncode, 0, bad)
            self.assertIn("imgfs:", p.stderr)
        m.stop()

    def test_cancel_and_ctrl_c_on_wait(self):
        m = self.m
        self.start_slow_commit(m)
        p = subprocess.Popen([harness.IMGFS, "commit", m.mountpoint, "vm", "--wait"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # The first progress line comes after the handler is in place (slow under ASan).
        self.assertIn("commit", p.stdout.readline())
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=10)
        self.assertEqual(p.returncode, 130, err)
        self.assertIn("stopped waiting; the commit job on vm goes on", err)
        self.assertIn(f"imgfs job {m.mountpoint} vm cancel", err)
        self.assertIn(job(m, "vm")["state"], ("running", "paused"))
        run([harness.IMGFS, "job", m.mountpoint, "vm", "cancel"])
        deadline = time.time() + 30
        while job(m, "vm")["state"] != "concluded" and time.time() < deadline:
            time.sleep(0.05)
        self.assertEqual(job(m, "vm")["error"], "cancelled")
        p = run([harness.IMGFS, "job", m.mountpoint, "vm", "cancel"], check=False)
        self.assertNotEqual(p.returncode, 0)
        m.stop()

    def test_wait_follows_only_the_job_it_asked_for(self):
        m = self.m
        # An empty or "." image name would reach the mount's global files (a group snapshot
        # of every image); an empty snapshot name never reaches the daemon at all.
        for argv in (["snapshot", m.mountpoint, "", "s9"], ["snapshot", m.mountpoint, ".", "s9"],
                     ["snapshot", m.mountpoint, "vm", ""], ["commit", m.mountpoint, "", "--wait"],
                     ["job", m.mountpoint, "..", "cancel"],
                     ["snapshot", m.mountpoint, "--group", "s9", "vm", "my vm"],
                     ["snapshot", m.mountpoint, "--group", "s9", ""],
                     ["snapshot", m.mountpoint, "--group", "nightly vm"],
                     ["snapshot", m.mountpoint, "--group", ""],
                     ["snapshot", m.mountpoint, "--group", "s9", "vm", "typo"]):
            p = run([harness.IMGFS, *argv], check=False)
            self.assertNotEqual(p.returncode, 0, argv)
            self.assertIn("imgfs:", p.stderr)
            if argv[-1] == "typo":
                self.assertIn(f"no image 'typo' under {m.mountpoint}", p.stderr)
        self.assertEqual(chain(m, "vm"), ["vm@s1.qcow2", "vm.qcow2"])
        run([harness.IMGFS, "snapshot", m.mountpoint, "vm", "s2"])
        self.start_slow_commit(m)  # vm@s2 into vm@s1
        self.assertEqual(job(m, "vm")["base"], "vm@s1.qcow2")
        # A commit into another layer is refused, not followed as if it were this one.
        p = run([harness.IMGFS, "commit", m.mountpoint, "vm", "--base", "vm.qcow2", "--wait"],
                check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertNotIn("following it", p.stderr)
        p = run([harness.IMGFS, "job", m.mountpoint, "vm", "pause", "--wait"], timeout=30)
        self.assertEqual(job(m, "vm")["state"], "paused")
        p = run([harness.IMGFS, "job", m.mountpoint, "vm", "cancel", "--wait"], timeout=30)
        self.assertEqual(job(m, "vm")["error"], "cancelled")
        self.assertEqual(chain(m, "vm"), ["vm@s2.qcow2", "vm@s1.qcow2", "vm.qcow2"])
        # The commit asked for is followed to its own end, whatever the job file shows then.
        p = run([harness.IMGFS, "commit", m.mountpoint, "vm", "--base", "vm.qcow2", "--wait"],
                timeout=120)
        self.assertEqual(chain(m, "vm"), ["vm.qcow2"])
        m.stop()


class Examples(unittest.TestCase):
    """The walkthroughs in examples/ run as a user would run them, and check their own
    outcome (each ends with the state it describes checked by qemu-img and debugfs)."""

    def run_example(self, name):
        harness.require_root()
        harness.require_tools("qemu-img", "losetup", "mkfs.ext4", "e2fsck", "debugfs",
                              "fsfreeze", "sfdisk", "partx")
        script = os.path.join(os.path.dirname(__file__), "..", "..", "examples", name)
        p = subprocess.run(["bash", script], env=dict(os.environ, IMGFS_BIN=harness.IMGFS),
                           capture_output=True, text=True, timeout=300)
        self.assertEqual(p.returncode, 0, f"{name} failed:\n{p.stdout[-4000:]}\n{p.stderr[-2000:]}")
        self.assertIn("== Done", p.stdout)

    def test_demo(self):
        self.run_example("demo.sh")

    def test_offline_disk(self):
        self.run_example("offline-disk.sh")

    def test_try_then_keep(self):
        self.run_example("try-then-keep.sh")

    def test_live_backup(self):
        self.run_example("live-backup.sh")

    def test_pipeline(self):
        self.run_example("pipeline.sh")


if __name__ == "__main__":
    harness.main_with_summary("product")
