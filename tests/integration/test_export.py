#!/usr/bin/env python3
"""FUSE export: a directory of qemu-img images served as NAME.raw (issue: FUSE export).

Every class but AllocationMap also runs on a Ceph pool (the NAMEOnPool classes at the end, same
test bodies; see ceph_pool.py). Not on a pool: AllocationMap, because RBD knows allocation per
object (from a 4 MiB object's start to its last written byte), coarser than the file qemu-img
maps (RbdNodeTest.BlockStatusFollowsWhatWasWritten tests what it does say), and the rescan tests,
which unlink or rename an image the daemon has open: RBD refuses to remove an image that is
open."""

import errno
import json
import mmap
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

import ceph_pool
import harness
from harness import run, qemu_img, qemu_io, check, convert_raw

MiB = 1 << 20


class ImageDirectory(harness.ImageDirTest):
    def build(self):
        qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", self.img("v2.qcow2"), "32M")
        qemu_io(self.img("v2.qcow2"), "write -P 0x21 0 1M", "write -P 0x22 30M 64k")
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,refcount_bits=64",
                 self.img("small.qcow2"), "24M")
        qemu_io(self.img("small.qcow2"), "write -P 0x31 4095 10000", "write -z 1M 64k")
        qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", self.img("ext.qcow2"), "40M")
        qemu_io(self.img("ext.qcow2"), "write -P 0x41 2048 2048", "write -P 0x42 20M 3M")
        # Compressed (zstd) from a raw source.
        qemu_img("create", "-q", "-f", "raw", self.img("src.tmp"), "16M")
        qemu_io(self.img("src.tmp"), "write -P 0x51 0 4M", fmt="raw")
        qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd",
                 self.img("src.tmp"), self.img("packed.qcow2"))
        os.unlink(self.img("src.tmp"))
        # A 3-deep chain: raw base (shorter), qcow2 middle, qcow2 top.
        qemu_img("create", "-q", "-f", "raw", self.img("base.img"), "8M")
        qemu_io(self.img("base.img"), "write -P 0x61 0 8M", fmt="raw")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.img", "-F", "raw", self.img("mid.qcow2"), "16M")
        qemu_io(self.img("mid.qcow2"), "write -P 0x62 1M 2M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", self.img("vm@snap1.qcow2"), "24M")
        qemu_io(self.img("vm@snap1.qcow2"), "write -P 0x63 2M 100k", "write -P 0x64 20M 1M")
        # A plain raw image.
        qemu_img("create", "-q", "-f", "raw", self.img("disk.raw"), "12M")
        qemu_io(self.img("disk.raw"), "write -P 0x71 5M 1M", fmt="raw")
        # Two roots wanting one name; a broken image; a backing file outside the directory.
        qemu_img("create", "-q", "-f", "qcow2", self.img("twin.qcow2"), "1M")
        qemu_img("create", "-q", "-f", "qcow2", self.img("twin@b.qcow2"), "1M")
        with open(self.img("broken.qcow2"), "wb") as f:
            f.write(b"QFI\xfb" + b"\x00\x00\x00\x03" + b"\xff" * 200)
        outside = tempfile.mkdtemp(prefix="imgfs-outside-")
        self.addCleanup(shutil.rmtree, outside, True)
        qemu_img("create", "-q", "-f", "raw", os.path.join(outside, "secret.img"), "1M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", os.path.join(outside, "secret.img"), "-F", "raw",
                 "-u", self.img("escape.qcow2"), "1M")
        return {
            "v2": "v2.qcow2", "small": "small.qcow2", "ext": "ext.qcow2", "packed": "packed.qcow2",
            "vm": "vm@snap1.qcow2", "disk": "disk.raw",
        }

    def test_every_export_matches_qemu_and_writes_land(self):
        roots = self.build()
        expected = {n: convert_raw(self.img(f)) for n, f in roots.items()}
        m = self.mount()
        self.assertEqual(m.exports(), sorted(roots))  # layers, twins, broken, escape: absent
        log = m.read_log()
        self.assertIn("twin", log)
        self.assertIn("broken.qcow2", log)
        self.assertIn("outside the image directory", log)
        models = {}
        for name, data in expected.items():
            with open(m.path(name + ".raw"), "rb") as f:
                got = f.read()
            self.assertEqual(len(got), len(data), name)
            self.assertTrue(got == data, f"{name}.raw differs from qemu-img convert")
            models[name] = bytearray(data)
        for i, name in enumerate(sorted(models)):
            harness.random_writes(m.path(name + ".raw"), models[name], seed=100 + i, count=60)
        m.stop()
        for name, f in roots.items():
            model = self.img(name + ".model")
            with open(model, "wb") as out:
                out.write(models[name])
            fmt = "raw" if f.endswith(".raw") else "qcow2"
            run(["qemu-img", "compare", "-f", "raw", "-F", fmt, model, self.img(f)])
            if fmt == "qcow2":
                c = check(self.img(f))
                self.assertEqual((c["corruptions"], c["leaks"], c["check-errors"]), (0, 0, 0), c["text"])
        # The layers below the top were not touched.
        self.assertEqual(check(self.img("mid.qcow2"))["exit"], 0)


class LoopMount(harness.ImageDirTest):
    def test_ext4_on_a_loop_device(self):
        harness.require_tools("losetup", "mkfs.ext4", "e2fsck")
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "512M")
        m = self.mount()
        loop = run(["losetup", "-f", "--show", m.path("vm.raw")]).stdout.strip()
        run(["mkfs.ext4", "-q", loop])
        fsdir = tempfile.mkdtemp(prefix="imgfs-ext4-")
        self.addCleanup(shutil.rmtree, fsdir, True)
        run(["mount", loop, fsdir])
        # The loop device's writeback comes back to the daemon: every thread of it must be an
        # I/O flusher (PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE), or reclaim can deadlock it. That
        # takes CAP_SYS_RESOURCE; without it (some containers) the daemon must say so.
        with open(f"/proc/{m.proc.pid}/status") as f:
            caps = int(re.search(r"^CapEff:\s*([0-9a-f]+)", f.read(), re.M).group(1), 16)
        if caps & (1 << 24):
            for tid in os.listdir(f"/proc/{m.proc.pid}/task"):
                with open(f"/proc/{m.proc.pid}/task/{tid}/stat") as f:
                    flags = int(f.read().rsplit(")", 1)[1].split()[6])
                self.assertEqual(flags & 0x180000, 0x180000, f"thread {tid}: flags {flags:#x}")
        else:
            self.assertIn("cannot mark the daemon as an I/O flusher", m.read_log())
            print("no CAP_SYS_RESOURCE here: checked the warning, not the I/O flusher flags")
        # A few thousand real files.
        src = "/usr/share"
        run(f"cd {src} && find . -type f -size -256k 2>/dev/null | head -3000 > {self.dir}/list")
        run(f"cd {src} && tar cf - -T {self.dir}/list 2>/dev/null | (cd {fsdir} && tar xf -)")
        sums = run(f"cd {fsdir} && find . -type f -print0 | sort -z | xargs -0 sha256sum").stdout
        count = sums.count("\n")
        self.assertGreater(count, 2000)
        run(["umount", fsdir])
        run(["losetup", "-d", loop])
        run(["e2fsck", "-fn", m.path("vm.raw")])
        m.stop()
        c = check(self.img("vm.qcow2"))
        self.assertEqual((c["corruptions"], c["leaks"]), (0, 0), c["text"])
        # Remount: every checksum matches.
        m2 = self.mount()
        loop = run(["losetup", "-f", "--show", "-r", m2.path("vm.raw")]).stdout.strip()
        run(["mount", "-o", "ro", loop, fsdir])
        again = run(f"cd {fsdir} && find . -type f -print0 | sort -z | xargs -0 sha256sum").stdout
        run(["umount", fsdir])
        run(["losetup", "-d", loop])
        self.assertEqual(sums, again)
        m2.stop()


class Fio(harness.ImageDirTest):
    def test_randwrite_verify_qd32(self):
        harness.require_tools("fio")
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "256M")
        m = self.mount()
        raw = m.path("vm.raw")
        # On the test cluster's single in-memory OSD, 4k writes are about 5x slower than on a
        # local disk: a quarter of the data there, at the same depth (CI's time is bounded).
        size = "32M" if isinstance(self, ceph_pool.OnPool) else "128M"
        common = ["fio", "--name=v", f"--filename={raw}", "--ioengine=io_uring", "--direct=1",
                  "--bs=4k", "--iodepth=32", f"--size={size}", "--verify=crc32c", "--randseed=7",
                  "--verify_state_save=0"]
        run(common + ["--rw=randwrite", "--do_verify=1"])
        run(common + ["--rw=randwrite", "--verify_only"])  # read-back verify of what was written
        run(["fio", "--name=r", f"--filename={raw}", "--ioengine=io_uring", "--direct=1", "--bs=4k",
             "--iodepth=32", "--rw=randread", f"--size={size}", "--runtime=3", "--time_based"])
        depth = m.info("vm")["max_requests_in_flight"]
        self.assertGreaterEqual(depth, 24, "QD32 did not reach the block layer concurrently")
        m.stop()
        c = check(self.img("vm.qcow2"))
        self.assertEqual((c["corruptions"], c["leaks"]), (0, 0), c["text"])
        print(f"max requests in flight at QD32: {depth}")


class Kill(harness.ImageDirTest):
    def test_kill9_during_writes(self):
        harness.require_tools("fio")
        for name in ("a", "b"):
            qemu_img("create", "-q", "-f", "qcow2", self.img(f"{name}.qcow2"), "256M")
        for round_ in range(3):
            m = self.mount()
            load = subprocess.Popen(["fio", "--name=k", f"--filename={m.path('a.raw')}",
                                     "--ioengine=io_uring", "--direct=1", "--bs=64k", "--iodepth=16",
                                     "--rw=randwrite", "--size=200M", "--time_based", "--runtime=30"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            time.sleep(1.0 + round_ * 0.7)
            self.assertIsNone(load.poll(), "fio was not writing when the daemon was killed")
            m.kill()
            harness.kill_all(m.path("a.raw"))
            load.wait()
            self.mounts.remove(m)
            for name in ("a", "b"):
                c = check(self.img(f"{name}.qcow2"))
                self.assertEqual((c["corruptions"], c["check-errors"]), (0, 0), c["text"])
            # Nothing was synced, so the mappings may all be lost; but the data writes went
            # out, so the file grew (the clusters they took are leaks now).
            self.assertGreater(os.path.getsize(self.img("a.qcow2")), 4 * MiB,
                               "no write reached a.qcow2")
            # Every image opens again.
            m2 = self.mount()
            self.assertEqual(m2.exports(), ["a", "b"])
            m2.stop()
            self.mounts.remove(m2)


    def test_a_synchronous_write_survives_a_kill(self):
        # O_DSYNC on open, O_SYNC, and RWF_DSYNC on one write: each is durable when write()
        # returns, with no fsync after it (the kernel sends none for these files).
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "64M")
        m = self.mount()
        pieces = [(os.O_DSYNC, 0, 1 * MiB), (os.O_SYNC, 0, 9 * MiB), (0, os.RWF_DSYNC, 17 * MiB)]
        fds = []  # kept open until after the kill: a close sends FLUSH, which would sync
        buf = mmap.mmap(-1, 65536)
        for i, (open_flag, write_flag, offset) in enumerate(pieces):
            fds.append(os.open(m.path("vm.raw"), os.O_WRONLY | os.O_DIRECT | open_flag))
            buf.seek(0)
            buf.write(bytes([0x31 + i]) * 65536)
            self.assertEqual(os.pwritev(fds[-1], [buf], offset, write_flag), 65536)
        m.kill()
        self.mounts.remove(m)
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass  # the connection is gone
        c = check(self.img("vm.qcow2"))
        self.assertEqual((c["corruptions"], c["check-errors"]), (0, 0), c["text"])
        for i, (_, _, offset) in enumerate(pieces):
            out = run(["qemu-io", "-f", "qcow2", "-c", f"read -P {0x31 + i} {offset} 64k",
                       self.img("vm.qcow2")]).stdout
            self.assertNotIn("Pattern verification failed", out, f"piece {i}: {out}")


class AllocationMap(harness.ImageDirTest):
    def seek_map(self, path):
        """[(start, end, is_data)] from SEEK_DATA/SEEK_HOLE."""
        fd = os.open(path, os.O_RDONLY)
        size = os.fstat(fd).st_size
        out = []
        pos = 0
        try:
            while pos < size:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    out.append((pos, size, False))
                    break
                if data > pos:
                    out.append((pos, data, False))
                hole = os.lseek(fd, data, os.SEEK_HOLE)
                out.append((data, hole, True))
                pos = hole
        finally:
            os.close(fd)
        return out

    def qemu_map(self, image):
        out = []
        for e in json.loads(run(["qemu-img", "map", "--output=json", image]).stdout):
            start, end = e["start"], e["start"] + e["length"]
            data = bool(e["data"])
            if out and out[-1][2] == data and out[-1][1] == start:
                out[-1] = (out[-1][0], end, data)
            else:
                out.append((start, end, data))
        return out

    def test_seek_matches_qemu_map(self):
        qemu_img("create", "-q", "-f", "raw", self.img("base.img"), "16M")
        qemu_io(self.img("base.img"), "write -P 1 1M 1M", "write -P 1 9M 64k", fmt="raw")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.img", "-F", "raw", self.img("vm.qcow2"), "32M")
        qemu_io(self.img("vm.qcow2"), "write -P 2 0 64k", "write -z 1M 256k", "write -P 3 20M 128k",
                "write -P 4 1500k 64k")
        m = self.mount()
        ours = self.seek_map(m.path("vm.raw"))
        m.stop()
        self.assertEqual(ours, self.qemu_map(self.img("vm.qcow2")))


class Behaviour(harness.ImageDirTest):
    def test_grow_and_refuse_shrink(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "16M")
        m = self.mount()
        os.truncate(m.path("vm.raw"), 32 * MiB)
        self.assertEqual(os.stat(m.path("vm.raw")).st_size, 32 * MiB)
        with self.assertRaises(OSError):
            os.truncate(m.path("vm.raw"), 8 * MiB)
        fd = os.open(m.path("vm.raw"), os.O_RDWR)
        os.pwrite(fd, b"end", 32 * MiB - 3)
        with self.assertRaises(OSError):
            os.pwrite(fd, b"x", 32 * MiB)  # past the end
        os.close(fd)
        m.stop()
        self.assertIn("virtual size: 32 MiB", run(["qemu-img", "info", self.img("vm.qcow2")]).stdout)
        self.assertEqual(check(self.img("vm.qcow2"))["exit"], 0)

    def test_a_large_extended_attribute_is_answered(self):
        # A request larger than the daemon's argument area (a setxattr value of 5,000 bytes)
        # must still get an answer: one without a reply leaves the caller waiting for ever.
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "16M")
        m = self.mount()
        code = ("import os, sys\n"
                "for size in (5000, 16, 60000):\n"
                "    try:\n"
                "        os.setxattr(sys.argv[1], 'user.imgfs-test', b'x' * size)\n"
                "    except OSError as e:\n"
                "        print(size, e.errno)\n")
        p = run([sys.executable, "-c", code, m.path("vm.raw")], timeout=30)
        unsupported = str(errno.EOPNOTSUPP)
        self.assertEqual(p.stdout.split(), ["5000", unsupported, "16", unsupported,
                                            "60000", unsupported], p.stdout + p.stderr)
        # A symbolic link with a long target is as large, and refused as a short one is (it
        # got E2BIG).
        for target in ("t", "t" * 4095):  # the longest a link may hold
            with self.assertRaises(OSError) as refused:
                os.symlink(target, m.path("link"))
            self.assertEqual(refused.exception.errno, errno.EPERM, len(target))
        # The mount still serves, and nothing was logged as malformed.
        with open(m.path("vm.raw"), "rb") as f:
            self.assertEqual(len(f.read(4096)), 4096)
        m.stop()
        self.assertNotIn("malformed", m.read_log())

    def test_fallocate_punch_and_zero(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "16M")
        qemu_io(self.img("vm.qcow2"), "write -P 0x55 0 16M")
        m = self.mount()
        run(["fallocate", "--punch-hole", "--offset", "1M", "--length", "2M", m.path("vm.raw")])
        run(["fallocate", "--zero-range", "--offset", "5M", "--length", "100k", m.path("vm.raw")])
        with open(m.path("vm.raw"), "rb") as f:
            data = f.read()
        m.stop()
        self.assertEqual(data[MiB:3 * MiB], bytes(2 * MiB))
        self.assertEqual(data[5 * MiB:5 * MiB + 100 * 1024], bytes(100 * 1024))
        self.assertEqual(data[3 * MiB], 0x55)
        self.assertEqual(data, convert_raw(self.img("vm.qcow2")))
        c = check(self.img("vm.qcow2"))
        self.assertEqual((c["corruptions"], c["leaks"]), (0, 0), c["text"])

    def test_info_rescan_and_readonly(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("a.qcow2"), "1M")
        m = self.mount()
        info = m.info("a")
        self.assertEqual(info["layers"][0]["format"], "qcow2")
        self.assertEqual(info["virtual_size"], MiB)
        qemu_img("create", "-q", "-f", "qcow2", self.img("b.qcow2"), "2M")
        os.unlink(self.img("a.qcow2"))
        with open(m.path(".control", "rescan"), "w") as f:
            f.write("\n")
        self.assertEqual(m.exports(), ["b"])
        with self.assertRaises(OSError):
            with open(m.path(".control", "rescan"), "w") as f:
                f.write("bogus")
        m.stop()
        ro = self.mount("ro")
        before = convert_raw(self.img("b.qcow2"))
        for change in (lambda: open(ro.path("b.raw"), "r+b"),
                       lambda: os.truncate(ro.path("b.raw"), 4 * MiB),
                       lambda: os.utime(ro.path("b.raw")),
                       lambda: os.chmod(ro.path("b.raw"), 0o644),
                       lambda: open(ro.path("new.raw"), "wb"),
                       lambda: os.rename(ro.path("b.raw"), ro.path("c.raw"))):
            with self.assertRaises(OSError) as refused:
                change()
            self.assertEqual(refused.exception.errno, errno.EROFS)
        p = run(["fallocate", "-l", "4M", ro.path("b.raw")], check=False)
        self.assertNotEqual(p.returncode, 0)
        # losetup, refused a read-write open, sets up a read-only loop device.
        dev = run(["losetup", "--find", "--show", ro.path("b.raw")]).stdout.strip()
        try:
            with open(f"/sys/block/{os.path.basename(dev)}/ro") as f:
                self.assertEqual(f.read().strip(), "1")
        finally:
            run(["losetup", "-d", dev], check=False)
        # Commands are refused, a rescan is not: an image added since shows up.
        fd = os.open(ro.path(".control", "b", "snapshot"), os.O_WRONLY)
        with self.assertRaises(OSError) as refused:
            os.write(fd, b"s1\n")
        os.close(fd)
        self.assertEqual(refused.exception.errno, errno.EROFS)
        qemu_img("create", "-q", "-f", "qcow2", self.img("d.qcow2"), "1M")
        with open(ro.path(".control", "rescan"), "w") as f:
            f.write("\n")
        self.assertEqual(ro.exports(), ["b", "d"])
        ro.stop()
        self.assertTrue(convert_raw(self.img("b.qcow2")) == before)
        self.assertEqual(sorted(os.listdir(self.dir)), ["b.qcow2", "d.qcow2"])

    def test_an_image_exported_again_opens_through_a_cached_name(self):
        # The kernel keeps a looked-up name for a second. Rescans that drop vm and export it
        # again give it a new inode number; an open through the cached name must find the new
        # export (ESTALE makes the kernel look it up again), not fail.
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "4M")
        m = self.mount()
        os.stat(m.path("vm.raw"))  # caches the name
        os.rename(self.img("vm.qcow2"), self.img("vm.old"))
        with open(m.path(".control/rescan"), "w") as f:
            f.write("\n")
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "8M")
        with open(m.path(".control/rescan"), "w") as f:
            f.write("\n")
        with open(m.path("vm.raw"), "rb") as f:
            self.assertEqual(os.fstat(f.fileno()).st_size, 8 * MiB, m.read_log())
        self.assertEqual(os.stat(m.path("vm.raw")).st_size, 8 * MiB)
        m.stop()

    def test_mount_options_and_modes(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("a.qcow2"), "1M")
        m = self.mount()
        with open("/proc/mounts") as f:
            line = [l for l in f if f" {m.mountpoint} " in l][0]
        for opt in ("nosuid", "nodev"):
            self.assertIn(opt, line.split()[3])
        self.assertIn("default_permissions", line)
        self.assertEqual(stat.S_IMODE(os.stat(m.path("a.raw")).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(m.path(".control", "a", "info")).st_mode), 0o400)
        # Another user is denied without allow_other.
        harness.require_tools("setpriv")
        p = run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat",
                 m.path(".control", "a", "info")], check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("Permission denied", p.stderr)
        m.stop()

    def test_sigterm_shutdown_is_clean(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("a.qcow2"), "64M")
        m = self.mount()
        fd = os.open(m.path("a.raw"), os.O_RDWR)
        for i in range(64):
            os.pwrite(fd, bytes([i]) * 65536, i * 3 * 65536 + 17)
        os.close(fd)
        m.proc.send_signal(signal.SIGTERM)
        self.assertEqual(m.wait_exit(timeout=30), 0, m.read_log())
        c = check(self.img("a.qcow2"))
        self.assertEqual((c["corruptions"], c["leaks"], c["check-errors"]), (0, 0, 0), c["text"])
        data = convert_raw(self.img("a.qcow2"))
        self.assertEqual(data[5 * 3 * 65536 + 17], 5)

    def test_sigterm_with_the_file_open_serves_it_until_closed(self):
        # SIGTERM detaches the mount; a file open at that moment (a loop device, a VM) is still
        # served until it is closed, and only then does the daemon flush and exit.
        qemu_img("create", "-q", "-f", "qcow2", self.img("a.qcow2"), "64M")
        m = self.mount()
        code = ("import os, sys, time\n"
                "fd = os.open(sys.argv[1], os.O_RDWR)\n"
                "os.pwrite(fd, b'before' * 1000, 0)\n"
                "print('open', flush=True)\n"
                "sys.stdin.readline()\n"  # the test sends SIGTERM meanwhile
                "os.pwrite(fd, b'after' * 1000, 1 << 20)\n"
                "os.fsync(fd)\n"
                "assert os.pread(fd, 6, 0) == b'before'\n"
                "os.close(fd)\n"
                "print('closed', flush=True)\n")
        client = subprocess.Popen([sys.executable, "-c", code, m.path("a.raw")], text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            self.assertEqual(client.stdout.readline().strip(), "open")
            m.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while os.path.ismount(m.mountpoint) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.assertFalse(os.path.ismount(m.mountpoint), "SIGTERM did not detach the mount")
            self.assertIsNone(m.proc.poll(), "the daemon exited while a file was open")
            out, _ = client.communicate("go\n", timeout=30)
        finally:
            if client.poll() is None:
                client.kill()
        self.assertEqual((client.returncode, out.strip()), (0, "closed"))
        self.assertEqual(m.wait_exit(timeout=30), 0, m.read_log())
        self.assertEqual(check(self.img("a.qcow2"))["exit"], 0)
        data = convert_raw(self.img("a.qcow2"))
        self.assertEqual(data[:6], b"before")
        self.assertEqual(data[1 << 20:(1 << 20) + 5], b"after")

    def test_fstab_style_mount(self):
        harness.require_tools("mount.fuse3")
        qemu_img("create", "-q", "-f", "qcow2", self.img("a.qcow2"), "1M")
        mnt = tempfile.mkdtemp(prefix="imgfs-fstab-")
        self.addCleanup(shutil.rmtree, mnt, True)
        # Without the installed mount.fuse.imgfs helper (scripts/package_test.sh tests that one),
        # mount(8) falls back to mount.fuse3, which runs `imgfs` from its fixed PATH: this is the
        # path of a build that was copied somewhere by hand, and the daemon's fuse3-style
        # argument parsing. Put imgfs where mount.fuse3 looks for it.
        link = "/usr/local/sbin/imgfs"
        if not os.path.exists(link):
            os.symlink(os.path.realpath(harness.IMGFS), link)
            self.addCleanup(os.unlink, link)
        self.sync_store()
        opts = ",".join(o for o in ("rw,noatime,allow_other", self.store_options()) if o)
        run(["mount", "-t", "fuse.imgfs", "-o", opts, self.source(), mnt])
        try:
            with open(os.path.join(mnt, "a.raw"), "r+b") as f:
                f.write(b"fstab" * 100)
        finally:
            run([harness.IMGFS, "unmount", mnt])
        self.pull_store()
        c = check(self.img("a.qcow2"))
        self.assertEqual((c["corruptions"], c["leaks"], c["check-errors"]), (0, 0, 0), c["text"])
        self.assertEqual(convert_raw(self.img("a.qcow2"))[:500], b"fstab" * 100)


ceph_pool.on_both_stores(globals(), ImageDirectory, LoopMount, Fio, Kill, Behaviour, heavy=(Fio, Kill),
                         directory_only=("test_info_rescan_and_readonly",
                                         "test_an_image_exported_again_opens_through_a_cached_name"))

if __name__ == "__main__":
    harness.main()
