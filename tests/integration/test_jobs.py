#!/usr/bin/env python3
"""Control files and jobs: live snapshot, group snapshot, active commit, revert, stream."""

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
import zlib

import harness
from harness import run, qemu_img, qemu_io, check, convert_raw
from test_concurrency import punch_hole

MiB = 1 << 20
BLOCK = 65536


def control(m, name, file, text):
    """Writes one command; returns 0 or the errno."""
    try:
        fd = os.open(m.path(".control", name, file) if name else m.path(".control", file), os.O_WRONLY)
    except OSError as e:
        return e.errno
    try:
        os.write(fd, text.encode())
        return 0
    except OSError as e:
        return e.errno
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # the daemon may have been killed meanwhile


def read_control(m, name, file):
    with open(m.path(".control", name, file)) as f:
        return f.read()


def chain(m, name):
    return read_control(m, name, "snapshot").split()


def wait_job(m, name, timeout=120, seen=None):
    """Waits for the job on `name` to conclude; appends every status read to `seen`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        j = json.loads(read_control(m, name, "job"))
        if seen is not None:
            seen.append(j)
        if j["state"] == "concluded":
            return j
        time.sleep(0.05)
    raise AssertionError(f"job on {name} did not finish: {j}")


def file_sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class SequenceWriter(threading.Thread):
    """Writes block i % nblocks with a record of sequence number i, one write at a time, so the
    state at any instant is exactly 'the first k writes applied'."""

    def __init__(self, path, nblocks, seed=1):
        super().__init__(daemon=True)
        self.path, self.nblocks, self.rng = path, nblocks, random.Random(seed)
        self.stop = threading.Event()
        self.order = []  # block of each write
        self.error = None

    @staticmethod
    def payload(seq):
        return struct.pack("<Q", seq + 1) * (BLOCK // 8)

    def run(self):
        fd = os.open(self.path, os.O_RDWR | os.O_DIRECT)
        try:
            seq = 0
            while not self.stop.is_set():
                block = self.rng.randrange(self.nblocks)
                self.order.append(block)
                mm = memoryview(self.payload(seq))
                os.pwrite(fd, mm, block * BLOCK)
                seq += 1
        except OSError as e:
            self.error = e
        finally:
            os.close(fd)

    def state_after(self, k):
        data = bytearray(self.nblocks * BLOCK)
        for seq in range(k):
            b = self.order[seq]
            data[b * BLOCK:(b + 1) * BLOCK] = self.payload(seq)
        return bytes(data)


def prefix_of(writer, data):
    """The k for which `data` is exactly the state after the writer's first k writes, or None."""
    k = 0
    for b in range(writer.nblocks):
        seq = struct.unpack_from("<Q", data, b * BLOCK)[0]
        k = max(k, seq)
    return k if writer.state_after(k) == data[:writer.nblocks * BLOCK] else None


class Snapshot(harness.ImageDirTest):
    def test_snapshot_under_a_writer_freezes_an_exact_state(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm1.qcow2"), "64M")
        m = self.mount()
        w = SequenceWriter(m.path("vm1.raw"), nblocks=256)
        w.start()
        deadline = time.time() + 30
        while len(w.order) < 10 and w.is_alive() and time.time() < deadline:
            time.sleep(0.05)  # some writes before the snapshot, however slow the build
        self.assertEqual(control(m, "vm1", "snapshot", "s1\n"), 0)
        frozen = self.img("vm1.qcow2")
        sha1 = file_sha(frozen)
        time.sleep(1.0)  # the writer keeps going, into the new layer
        sha2 = file_sha(frozen)
        w.stop.set()
        w.join()
        self.assertIsNone(w.error)
        self.assertEqual(sha1, sha2, "the frozen layer changed after the snapshot")
        self.assertEqual(chain(m, "vm1"), ["vm1@s1.qcow2", "vm1.qcow2"])
        info = json.loads(run(["qemu-img", "info", "-U", "--output=json", self.img("vm1@s1.qcow2")]).stdout)
        self.assertEqual(info["backing-filename"], "vm1.qcow2")
        self.assertEqual(info.get("backing-filename-format"), "qcow2")
        k = prefix_of(w, convert_raw(frozen))
        self.assertIsNotNone(k, "the frozen layer is not the state after any prefix of writes")
        self.assertGreater(k, 0)
        self.assertLess(k, len(w.order))
        m.stop()
        for f in ("vm1.qcow2", "vm1@s1.qcow2"):
            c = check(self.img(f))
            self.assertEqual((c["corruptions"], c["leaks"]), (0, 0), c["text"])
        print(f"snapshot froze the state after write {k} of {len(w.order)}")

    def test_snapshot_of_a_loop_mounted_ext4_under_load(self):
        harness.require_tools("losetup", "mkfs.ext4")
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm1.qcow2"), "256M")
        m = self.mount()
        loop = run(["losetup", "-f", "--show", m.path("vm1.raw")]).stdout.strip()
        run(["mkfs.ext4", "-q", loop])
        fs = tempfile.mkdtemp(prefix="imgfs-fs-")
        self.addCleanup(shutil.rmtree, fs, True)
        run(["mount", loop, fs])
        writer = subprocess.Popen(["sh", "-c", f"while true; do dd if=/dev/urandom of={fs}/f bs=1M "
                                   f"count=20 conv=fsync status=none; done"], start_new_session=True)
        try:
            time.sleep(1)
            self.assertEqual(control(m, "vm1", "snapshot", "before-upgrade"), 0)
            sha1 = file_sha(self.img("vm1.qcow2"))
            time.sleep(2)
            self.assertEqual(sha1, file_sha(self.img("vm1.qcow2")))
        finally:
            os.killpg(writer.pid, 9)
            writer.wait()
            harness.kill_all(f"of={fs}/f")
            run(["umount", fs])
            run(["losetup", "-d", loop])
        # The frozen layer is a crash-consistent ext4: journal replay makes it clean.
        copy = self.img("frozen.raw")
        qemu_img("convert", "-O", "raw", self.img("vm1.qcow2"), copy)
        p = run(["e2fsck", "-fy", copy], check=False)
        self.assertIn(p.returncode, (0, 1), p.stdout + p.stderr)
        m.stop()
        self.assertEqual(check(self.img("vm1@before-upgrade.qcow2"))["exit"], 0)

    def test_group_snapshot_is_all_or_nothing(self):
        for n in ("a", "b", "c"):
            qemu_img("create", "-q", "-f", "qcow2", self.img(f"{n}.qcow2"), "8M")
        m = self.mount()
        before = sorted(os.listdir(self.dir))
        for bad in ("s1 a b nope\n", "bad/name a b\n", "s1 a a\n", "s1 a\nb\n", "\n",
                    "s1 a\ns2 b\n"):
            self.assertEqual(control(m, None, "snapshot", bad), errno.EINVAL, repr(bad))
        self.assertEqual(sorted(os.listdir(self.dir)), before)
        self.assertEqual(chain(m, "a"), ["a.qcow2"])
        self.assertEqual(control(m, None, "snapshot", "s1 a c\n"), 0)
        self.assertEqual(chain(m, "a")[0], "a@s1.qcow2")
        self.assertEqual(chain(m, "c")[0], "c@s1.qcow2")
        self.assertEqual(chain(m, "b"), ["b.qcow2"])
        self.assertEqual(control(m, None, "snapshot", "all1"), 0)  # every image
        for n in ("a", "b", "c"):
            self.assertEqual(chain(m, n)[0], f"{n}@all1.qcow2")
        # From a shell, with echo's trailing newline: one write(), so one atomic command.
        run(["bash", "-c", f"echo all2 > {m.mountpoint}/.control/snapshot"])
        run(["bash", "-c", f"echo nightly a b > {m.mountpoint}/.control/snapshot"])
        for n in ("a", "b", "c"):
            self.assertEqual(chain(m, n)[0], f"{n}@nightly.qcow2" if n != "c" else "c@all2.qcow2")
        # The CLI wraps it.
        run([harness.IMGFS, "snapshot", m.mountpoint, "--group", "cli1", "b", "c"])
        self.assertEqual(chain(m, "b")[0], "b@cli1.qcow2")
        self.assertEqual(chain(m, "a")[0], "a@nightly.qcow2")
        run([harness.IMGFS, "snapshot", m.mountpoint, "--group", "cli2"])
        for n in ("a", "b", "c"):
            self.assertEqual(chain(m, n)[0], f"{n}@cli2.qcow2")
        m.stop()

    def test_crash_leftovers_are_removed_on_a_writable_mount(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "8M")
        leftover = self.img(".imgfs-vm@s1.qcow2.creating")
        with open(leftover, "wb") as f:
            f.write(b"QFI\xfb half written")
        m = self.mount("ro")
        self.assertEqual(m.exports(), ["vm"])
        m.stop()
        self.assertTrue(os.path.exists(leftover), "a read-only mount must not touch the directory")
        m = self.mount()
        self.assertEqual(m.exports(), ["vm"])
        self.assertFalse(os.path.exists(leftover))
        self.assertIn("left over from an interrupted snapshot", m.read_log())
        self.assertEqual(control(m, "vm", "snapshot", "s1"), 0)  # the name is free
        m.stop()

    def test_refusals_and_reasons(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm1.qcow2"), "512M")
        m = self.mount()
        for bad in ("a\nb", "a\0b", "", "-x", "a b", "x" * 65, ".hidden", "a/b"):
            self.assertEqual(control(m, "vm1", "snapshot", bad + "\n"), errno.EINVAL, repr(bad))
        self.assertIn("invalid snapshot name 'a/b'", m.info("vm1")["last_error"])
        # The CLI prints the reason as the daemon wrote it: JSON escapes decoded (a tab came
        # out as "t", a byte that is not UTF-8 as "ufffd").
        for bad, shown in (("a\tb", "'a\tb'"), (b"s\xff", "'s\ufffd'")):
            p = run([harness.IMGFS, "snapshot", m.mountpoint, "vm1", bad], check=False)
            self.assertEqual(p.returncode, 1)
            self.assertIn(shown, p.stderr)
        self.assertEqual(control(m, "vm1", "snapshot", "ok1"), 0)
        open(self.img("vm1@taken.qcow2"), "w").close()
        self.assertEqual(control(m, "vm1", "snapshot", "taken"), errno.EEXIST)
        self.assertEqual(control(m, "vm1", "commit", "bogus\n"), errno.EINVAL)
        self.assertEqual(control(m, "vm1", "commit", "base=nothere.qcow2\n"), errno.EINVAL)
        self.assertEqual(control(m, "vm1", "job", "explode\n"), errno.EINVAL)
        self.assertEqual(control(m, "vm1", "revert", "now\n"), errno.EINVAL)
        self.assertEqual(control(m, "vm1", "snapshot", "y" * 5000), errno.EINVAL)
        # A second job on the same image: EBUSY (a slow commit keeps the first one running).
        # 256 MiB to copy (hundreds of milliseconds even on a fast host): the commit must still
        # be running when "speed 1" comes in a millisecond later; from then on it crawls.
        fd = os.open(m.path("vm1.raw"), os.O_RDWR)
        for off in range(0, 256 * MiB, 4 * MiB):
            os.pwrite(fd, b"z" * (4 * MiB), off)
        os.close(fd)
        self.assertEqual(control(m, "vm1", "commit", "\n"), 0)
        self.assertEqual(control(m, "vm1", "job", "speed 1"), 0, "the commit ended too soon")
        self.assertEqual(control(m, "vm1", "commit", "\n"), errno.EBUSY)
        self.assertEqual(control(m, "vm1", "stream", "\n"), errno.EBUSY)
        self.assertEqual(control(m, "vm1", "job", "cancel"), 0)
        j = wait_job(m, "vm1")
        self.assertEqual(j["error"], "cancelled")
        m.stop()
        os.unlink(self.img("vm1@taken.qcow2"))
        self.assertEqual(check(self.img("vm1@ok1.qcow2"))["exit"], 0)


class Commit(harness.ImageDirTest):
    def snapshot_fill_and_write(self, size, filled, writer_options):
        """vm.qcow2 of `size`, snapshotted, with `filled` written through the mount, and a
        64 KiB random writer over the disk (fio, time based); the mount and the writer."""
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), size)
        m = self.mount()
        self.assertEqual(control(m, "vm", "snapshot", "s1"), 0)
        run(["fio", "--name=fill", f"--filename={m.path('vm.raw')}", "--ioengine=io_uring",
             "--direct=1", "--bs=1M", "--iodepth=8", "--rw=write", f"--size={filled}"])
        writer = subprocess.Popen(["fio", "--name=w", f"--filename={m.path('vm.raw')}",
                                   "--ioengine=io_uring", "--direct=1", "--bs=64k", "--iodepth=4",
                                   "--rw=randwrite", f"--size={size}", "--time_based",
                                   *writer_options],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        return m, writer

    def test_active_commit_converges_under_a_random_writer(self):
        harness.require_tools("fio")
        m, writer = self.snapshot_fill_and_write("512M", "256M", ["--runtime=120"])
        try:
            time.sleep(1)
            t0 = time.time()
            self.assertEqual(control(m, "vm", "commit", "\n"), 0)
            # Converges while the writer (120 s) still writes, in the sanitizer build too.
            j = wait_job(m, "vm", timeout=110)
            took = time.time() - t0
        finally:
            harness.kill_all(m.path("vm.raw"))
            writer.wait()
        print(f"commit finished after {took:.1f} s; writer stopped")
        self.assertIsNone(j["error"], j)
        self.assertLess(took, 100.0, f"commit took {took:.1f} s")
        self.assertEqual(chain(m, "vm"), ["vm.qcow2"])
        self.assertFalse(os.path.exists(self.img("vm@s1.qcow2")))
        with open(m.path("vm.raw"), "rb") as f:
            shown = f.read()
        m.stop()
        self.assertTrue(convert_raw(self.img("vm.qcow2")) == shown)
        c = check(self.img("vm.qcow2"))
        self.assertEqual((c["corruptions"], c["leaks"], c["check-errors"]), (0, 0, 0), c["text"])
        print(f"active commit of 256 MiB under a 64 KiB random writer: {took:.1f} s, "
              f"{j['done_bytes'] / MiB:.0f} MiB copied")

    def test_commit_progress_grows_with_the_work_a_writer_adds(self):
        # A writer dirties ranges the commit has copied. Its total must grow with that work:
        # a client that showed done/total read 100 % (a running total, recounted only between
        # passes) while most of a pass was still to copy.
        harness.require_tools("fio")
        m, writer = self.snapshot_fill_and_write("128M", "128M", ["--runtime=60", "--rate=40m"])
        seen = []
        try:
            time.sleep(0.5)
            self.assertEqual(control(m, "vm", "commit", "\n"), 0)
            self.assertEqual(control(m, "vm", "job", f"speed {64 * MiB}"), 0)
            j = wait_job(m, "vm", timeout=50, seen=seen)
        finally:
            harness.kill_all(m.path("vm.raw"))
            writer.wait()
        self.assertIsNone(j["error"], j)
        running = [s for s in seen if s["state"] == "running" and s["done_bytes"] > 0]
        # A read at 100 % is right when nothing is left at that moment (the last pass sleeping
        # off the rate limit); wrong when a later read has more work in its total.
        wrong = [s for i, s in enumerate(running) if s["done_bytes"] >= s["total_bytes"] and
                 any(t["total_bytes"] > s["total_bytes"] for t in running[i + 1:])]
        print(f"commit of 128 MiB under a 40 MiB/s writer at 64 MiB/s: {j['done_bytes'] / MiB:.0f}"
              f" MiB copied, {len(running)} progress reads while running, {len(wrong)} said 100 % "
              f"with work to come")
        self.assertGreater(j["done_bytes"], 128 * MiB, "the writer added no work")
        self.assertGreaterEqual(len(running), 10)
        # One is allowed: just after the switch to mirroring writes, those that began before it
        # add their ranges when they end.
        self.assertLessEqual(len(wrong), 1, f"{len(wrong)} of {len(running)} reads said 100 % "
                                            f"with work still to come: {wrong[:3]}")
        totals = [s["total_bytes"] for s in running]
        self.assertEqual(totals, sorted(totals), "the total went down")
        m.stop()
        c = check(self.img("vm.qcow2"))
        self.assertEqual((c["corruptions"], c["leaks"], c["check-errors"]), (0, 0, 0), c["text"])

    def test_commit_into_a_deeper_base_and_shared_base_refused(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "32M")
        qemu_io(self.img("vm.qcow2"), "write -P 1 0 4M")
        qemu_img("create", "-q", "-f", "qcow2", self.img("base.qcow2"), "32M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", self.img("a.qcow2"), "32M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", self.img("b.qcow2"), "32M")
        # A base whose other user is not exported: c and c@x both want the name "c".
        qemu_img("create", "-q", "-f", "qcow2", self.img("base2.qcow2"), "32M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base2.qcow2", "-F", "qcow2", self.img("d.qcow2"), "32M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base2.qcow2", "-F", "qcow2", self.img("c.qcow2"), "32M")
        qemu_img("create", "-q", "-f", "qcow2", self.img("c@x.qcow2"), "32M")
        m = self.mount()
        self.assertNotIn("c", m.exports())
        # Shared base: EBUSY, nothing changes.
        before = sorted(os.listdir(self.dir))
        self.assertEqual(control(m, "a", "commit", "\n"), errno.EBUSY)
        self.assertIn("also used by b", m.info("a")["last_error"])
        self.assertEqual(control(m, "d", "commit", "\n"), errno.EBUSY)
        self.assertIn("base2.qcow2 is also used by c.qcow2, which this mount does not serve",
                      m.info("d")["last_error"])
        self.assertEqual(sorted(os.listdir(self.dir)), before)
        # Three layers deep: commit everything above vm.qcow2 into it.
        for i, snap in enumerate(("s1", "s2", "s3")):
            self.assertEqual(control(m, "vm", "snapshot", snap), 0)
            fd = os.open(m.path("vm.raw"), os.O_RDWR)
            os.pwrite(fd, bytes([0x10 + i]) * (MiB + 7), i * 3 * MiB + 123)
            os.close(fd)
        self.assertEqual(len(chain(m, "vm")), 4)
        with open(m.path("vm.raw"), "rb") as f:
            shown = f.read()
        self.assertEqual(control(m, "vm", "commit", "base=vm.qcow2\n"), 0)
        self.assertIsNone(wait_job(m, "vm")["error"])
        self.assertEqual(chain(m, "vm"), ["vm.qcow2"])
        with open(m.path("vm.raw"), "rb") as f:
            self.assertTrue(f.read() == shown)
        m.stop()
        self.assertEqual(sorted(f for f in os.listdir(self.dir) if f.startswith("vm")), ["vm.qcow2"])
        self.assertTrue(convert_raw(self.img("vm.qcow2")) == shown)
        self.assertEqual(check(self.img("vm.qcow2"))["exit"], 0)

    def test_commit_into_a_base_with_a_persistent_bitmap(self):
        # A base with a persistent dirty bitmap (what libvirt's backups leave): making it
        # writable clears its autoclear bits first, since imgfs keeps no bitmap up to date.
        # That write went through an edge without write permission, and the daemon aborted.
        qemu_img("create", "-q", "-f", "qcow2", self.img("base.qcow2"), "16M")
        qemu_io(self.img("base.qcow2"), "write -P 7 0 1M")
        qemu_img("bitmap", "--add", self.img("base.qcow2"), "b0")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                 self.img("vm.qcow2"), "16M")
        qemu_io(self.img("vm.qcow2"), "write -P 9 1M 1M")
        m = self.mount()
        with open(m.path("vm.raw"), "rb") as f:
            shown = f.read()
        self.assertEqual(control(m, "vm", "commit", "\n"), 0)
        self.assertIsNone(wait_job(m, "vm")["error"])
        with open(m.path("vm.raw"), "rb") as f:
            self.assertTrue(f.read() == shown)
        m.stop()
        self.assertTrue(convert_raw(self.img("base.qcow2"))[:2 * MiB] == shown[:2 * MiB])
        # The bitmaps are dropped whole: QEMU counted the clusters of bitmaps it took for
        # invalid as leaked.
        c = check(self.img("base.qcow2"))
        self.assertEqual((c["corruptions"], c["check-errors"], c["leaks"]), (0, 0, 0), c["text"])
        self.assertNotIn(b"bitmaps:", subprocess.run(
            ["qemu-img", "info", self.img("base.qcow2")], capture_output=True, check=True).stdout)
        with open(self.img("base.qcow2"), "rb") as f:
            f.seek(88)
            self.assertEqual(struct.unpack(">Q", f.read(8))[0], 0, "autoclear bits left set")

    def test_commit_into_a_base_with_bitmaps_under_a_writer(self):
        # The same, with a writer going on through the commit: the base's bitmaps (two, with
        # dirty bits, so they own data clusters) are dropped while the guest writes, and
        # nothing the writer wrote is lost, nothing leaks.
        qemu_img("create", "-q", "-f", "qcow2", self.img("base.qcow2"), "16M")
        qemu_img("bitmap", "--add", self.img("base.qcow2"), "b0")
        qemu_img("bitmap", "--add", "-g", "512", self.img("base.qcow2"), "b1")
        qemu_io(self.img("base.qcow2"), "write -P 7 0 8M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                 self.img("vm.qcow2"), "16M")
        qemu_io(self.img("vm.qcow2"), "write -P 9 4M 4M")
        m = self.mount()
        w = SequenceWriter(m.path("vm.raw"), nblocks=128)
        w.start()
        time.sleep(0.3)
        self.assertEqual(control(m, "vm", "commit", "\n"), 0)
        self.assertIsNone(wait_job(m, "vm")["error"])
        time.sleep(0.3)
        w.stop.set()
        w.join()
        self.assertIsNone(w.error)
        self.assertEqual(chain(m, "vm"), ["base.qcow2"])
        with open(m.path("vm.raw"), "rb") as f:
            shown = f.read()
        last = w.state_after(len(w.order))
        for b in set(w.order):
            self.assertTrue(shown[b * BLOCK:(b + 1) * BLOCK] == last[b * BLOCK:(b + 1) * BLOCK],
                            f"the last write to block {b} was lost")
        self.assertGreater(len(w.order), 0)
        m.stop()
        self.assertTrue(convert_raw(self.img("base.qcow2")) == shown)
        c = check(self.img("base.qcow2"))
        self.assertEqual((c["corruptions"], c["check-errors"], c["leaks"]), (0, 0, 0), c["text"])
        self.assertNotIn(b"bitmaps:", subprocess.run(
            ["qemu-img", "info", self.img("base.qcow2")], capture_output=True, check=True).stdout)

    def test_not_enough_space_is_refused_up_front(self):
        small = tempfile.mkdtemp(prefix="imgfs-small-")
        self.addCleanup(shutil.rmtree, small, True)
        run(["mount", "-t", "tmpfs", "-o", "size=48M", "tmpfs", small])
        self.addCleanup(run, ["umount", "-l", small], False)
        qemu_img("create", "-q", "-f", "raw", os.path.join(small, "base.raw"), "64M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
                 os.path.join(small, "base@s1.qcow2"), "64M")
        m = harness.Mount(small)
        self.mounts.append(m)
        m.start()
        fd = os.open(m.path("base.raw"), os.O_RDWR)
        for i in range(30):
            os.pwrite(fd, os.urandom(MiB), i * MiB)
        os.close(fd)
        # 30 MiB to copy, but the raw base is sparse and only ~18 MiB are free.
        self.assertEqual(control(m, "base", "commit", "\n"), errno.ENOSPC)
        self.assertIn("free", m.info("base")["last_error"])
        self.assertEqual(chain(m, "base"), ["base@s1.qcow2", "base.raw"])
        m.stop()


    def test_a_commit_into_a_base_of_another_name_serves_the_image_under_that_name(self):
        # The image is served under its root's name: committing vm1.qcow2 into golden.qcow2
        # makes golden.qcow2 the root. The commit warns in the log when it starts; the next
        # rescan (vm1.raw closed) serves the image as golden.raw.
        qemu_img("create", "-q", "-f", "qcow2", self.img("golden.qcow2"), "8M")
        qemu_io(self.img("golden.qcow2"), "write -P 1 0 8M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "golden.qcow2", "-F", "qcow2",
                 self.img("vm1.qcow2"), "8M")
        m = self.mount()
        fd = os.open(m.path("vm1.raw"), os.O_RDWR)
        os.pwrite(fd, b"\x02" * MiB, 0)
        os.close(fd)
        with open(m.path("vm1.raw"), "rb") as f:
            shown = f.read()
        self.assertEqual(control(m, "vm1", "commit", "\n"), 0, m.info("vm1")["last_error"])
        job = wait_job(m, "vm1")
        self.assertFalse(job.get("error"), job)
        self.assertIn("serves this image as golden.raw", m.read_log())
        self.assertEqual(chain(m, "vm1"), ["golden.qcow2"])
        self.assertEqual(control(m, None, "rescan", "\n"), 0, m.read_log())
        self.assertEqual(sorted(n for n in os.listdir(m.mountpoint) if n.endswith(".raw")),
                         ["golden.raw"])
        with open(m.path("golden.raw"), "rb") as f:
            self.assertTrue(f.read() == shown)
        m.stop()
        c = check(self.img("golden.qcow2"))
        self.assertEqual((c["corruptions"], c["check-errors"]), (0, 0), c["text"])
        self.assertTrue(convert_raw(self.img("golden.qcow2")) == shown)

    def test_a_commit_that_overwrites_in_place_needs_no_space(self):
        # The base holds data everywhere the overlay does: the commit overwrites it in place
        # and needs no new space, on a disk with less free than the overlay holds. (It was
        # refused with ENOSPC, on the nearly full disk where a commit gives space back.)
        small = tempfile.mkdtemp(prefix="imgfs-small-")
        self.addCleanup(shutil.rmtree, small, True)
        run(["mount", "-t", "tmpfs", "-o", "size=48M", "tmpfs", small])
        self.addCleanup(run, ["umount", "-l", small], False)
        with open(os.path.join(small, "base.raw"), "wb") as f:
            f.write(os.urandom(24 * MiB))
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
                 os.path.join(small, "base@s1.qcow2"), "24M")
        m = harness.Mount(small)
        self.mounts.append(m)
        m.start()
        fd = os.open(m.path("base.raw"), os.O_RDWR)
        for i in range(20):
            os.pwrite(fd, os.urandom(MiB), i * MiB)
        os.fsync(fd)
        os.close(fd)
        with open(m.path("base.raw"), "rb") as f:
            shown = f.read()
        free = os.statvfs(small)
        self.assertLess(free.f_bavail * free.f_frsize, 20 * MiB)
        self.assertEqual(control(m, "base", "commit", "\n"), 0, m.info("base")["last_error"])
        job = wait_job(m, "base")
        self.assertFalse(job.get("error"), job)
        self.assertEqual(chain(m, "base"), ["base.raw"])
        with open(m.path("base.raw"), "rb") as f:
            self.assertTrue(f.read() == shown, "the commit changed what base.raw shows")
        m.stop()
        with open(os.path.join(small, "base.raw"), "rb") as f:
            self.assertTrue(f.read() == shown, "the base does not hold what was shown")

class RevertStream(harness.ImageDirTest):
    def test_revert_restores_the_snapshot(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "16M")
        qemu_io(self.img("vm.qcow2"), "write -P 7 0 16M")
        m = self.mount()
        with open(m.path("vm.raw"), "rb") as f:
            before = f.read()
        self.assertEqual(control(m, "vm", "snapshot", "try"), 0)
        fd = os.open(m.path("vm.raw"), os.O_RDWR)
        os.pwrite(fd, b"x" * 100000, 5000)
        self.assertEqual(control(m, "vm", "revert", "\n"), errno.EBUSY)  # still open
        os.close(fd)
        self.assertEqual(control(m, "vm", "revert", "\n"), 0)
        with open(m.path("vm.raw"), "rb") as f:
            self.assertTrue(f.read() == before)
        self.assertFalse(os.path.exists(self.img("vm@try.qcow2")))
        self.assertEqual(control(m, "vm", "revert", "\n"), errno.EINVAL)  # nothing left to revert
        m.stop()
        self.assertTrue(convert_raw(self.img("vm.qcow2")) == before)

    def test_revert_right_after_a_loop_device_lets_go(self):
        # The kernel sends RELEASE after close() has returned, in the background. What an
        # operator does (detach the loop device, then revert at once) must not be refused
        # because NAME.raw still looks open: a revert waits up to a second for the release.
        harness.require_tools("losetup")
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "16M")
        qemu_io(self.img("vm.qcow2"), "write -P 7 0 16M")
        m = self.mount()
        with open(m.path("vm.raw"), "rb") as f:
            before = f.read()
        for i in range(5):
            self.assertEqual(control(m, "vm", "snapshot", f"s{i}"), 0, m.read_log())
            dev = run(["losetup", "-f", "--show", m.path("vm.raw")]).stdout.strip()
            run(["dd", "if=/dev/urandom", f"of={dev}", "bs=64k", "count=16", "oflag=direct",
                 "status=none"])
            run(["losetup", "-d", dev])
            self.assertEqual(control(m, "vm", "revert", "\n"), 0, m.read_log())
            with open(m.path("vm.raw"), "rb") as f:
                self.assertTrue(f.read() == before, f"round {i}: the revert lost the snapshot")
        m.stop()

    def write_and_stream(self, m, data, offset):
        """Writes `data` at `offset` of vm.raw, streams vm (whose top is vm@s1.qcow2), and
        requires that it stands alone showing what it showed before; returns that."""
        fd = os.open(m.path("vm.raw"), os.O_RDWR)
        os.pwrite(fd, data, offset)
        os.close(fd)
        with open(m.path("vm.raw"), "rb") as f:
            shown = f.read()
        self.assertEqual(control(m, "vm", "stream", "\n"), 0)
        self.assertIsNone(wait_job(m, "vm")["error"])
        self.assertEqual(chain(m, "vm"), ["vm@s1.qcow2"])
        with open(m.path("vm.raw"), "rb") as f:
            self.assertTrue(f.read() == shown)
        return shown

    def test_stream_makes_the_top_stand_alone(self):
        qemu_img("create", "-q", "-f", "raw", self.img("base.img"), "8M")
        qemu_io(self.img("base.img"), "write -P 3 0 8M", fmt="raw")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.img", "-F", "raw", self.img("vm.qcow2"), "16M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.img", "-F", "raw", self.img("other.qcow2"), "16M")
        qemu_io(self.img("vm.qcow2"), "write -P 4 1M 1M")
        m = self.mount()
        self.assertEqual(control(m, "vm", "snapshot", "s1"), 0)
        shown = self.write_and_stream(m, b"q" * 70000, 3 * MiB + 11)
        m.stop()
        # vm.qcow2 (vm's own history) is gone; base.img (also other's base) stays.
        self.assertFalse(os.path.exists(self.img("vm.qcow2")))
        self.assertTrue(os.path.exists(self.img("base.img")))
        info = json.loads(run(["qemu-img", "info", "-U", "--output=json", self.img("vm@s1.qcow2")]).stdout)
        self.assertNotIn("backing-filename", info)
        self.assertTrue(convert_raw(self.img("vm@s1.qcow2")) == shown)
        self.assertEqual(check(self.img("vm@s1.qcow2"))["exit"], 0)


    def test_stream_keeps_an_own_layer_an_unserved_image_uses(self):
        # Once vm.qcow2 is vm's older layer, c.qcow2 is made on it (a clone of the snapshot),
        # which this mount does not serve: the export "c" is c@x.qcow2's (in a pool: c.qcow2
        # would be another host's image). A stream of vm must not delete vm.qcow2, nor what
        # lies below it.
        qemu_img("create", "-q", "-f", "qcow2", self.img("base.qcow2"), "16M")
        qemu_io(self.img("base.qcow2"), "write -P 5 0 2M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                 self.img("vm.qcow2"))
        qemu_io(self.img("vm.qcow2"), "write -P 6 1M 2M")
        qemu_img("create", "-q", "-f", "qcow2", self.img("c@x.qcow2"), "16M")
        m = self.mount()
        self.assertEqual(control(m, "vm", "snapshot", "s1"), 0, m.read_log())
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "vm.qcow2", "-F", "qcow2",
                 self.img("c.qcow2"), "16M")
        clone = convert_raw(self.img("c.qcow2"))
        shown = self.write_and_stream(m, b"r" * 70000, 5 * MiB + 11)
        self.assertEqual(chain(m, "c"), ["c@x.qcow2"])  # c.qcow2 was never served
        self.assertIn("keeping vm.qcow2 and the layers below it: c.qcow2 uses it", m.read_log())
        m.stop()
        for name in ("vm.qcow2", "base.qcow2"):
            self.assertTrue(os.path.exists(self.img(name)), name)
        self.assertTrue(convert_raw(self.img("c.qcow2")) == clone)
        self.assertTrue(convert_raw(self.img("vm@s1.qcow2")) == shown)
        for name in ("vm@s1.qcow2", "c.qcow2", "vm.qcow2", "base.qcow2"):
            self.assertEqual(check(self.img(name))["exit"], 0, name)

    def test_a_clone_served_on_a_layer_a_snapshot_froze_keeps_it(self):
        # vm.qcow2 became vm's older layer in this session; c.qcow2 is then made on it and a
        # rescan serves it. The two chains open vm.qcow2 separately, and that is still one
        # file: a stream of vm must keep it, and a commit into it or a revert onto it must be
        # refused, or c would lose its backing file or see it change.
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "16M")
        qemu_io(self.img("vm.qcow2"), "write -P 6 0 2M")
        m = self.mount()
        self.assertEqual(control(m, "vm", "snapshot", "s1"), 0, m.read_log())
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "vm.qcow2", "-F", "qcow2",
                 self.img("c.qcow2"), "16M")
        self.assertEqual(control(m, None, "rescan", "\n"), 0, m.read_log())
        self.assertEqual(chain(m, "c"), ["c.qcow2", "vm.qcow2"])
        with open(m.path("c.raw"), "rb") as f:
            clone = f.read()
        self.assertEqual(control(m, "vm", "revert", "\n"), errno.EBUSY, m.read_log())
        self.assertEqual(control(m, "vm", "commit", "base=vm.qcow2\n"), errno.EBUSY,
                         m.read_log())
        self.assertIn("vm.qcow2 is also used by c", m.read_log())
        self.write_and_stream(m, b"s" * 70000, 3 * MiB + 5)
        with open(m.path("c.raw"), "rb") as f:
            self.assertTrue(f.read() == clone)
        m.stop()
        self.assertTrue(os.path.exists(self.img("vm.qcow2")))
        self.assertTrue(convert_raw(self.img("c.qcow2")) == clone)
        for name in ("vm@s1.qcow2", "c.qcow2", "vm.qcow2"):
            self.assertEqual(check(self.img(name))["exit"], 0, name)

    def refuses_edits_while_an_unserved_clone_uses(self, layer, commands):
        """Mounts vm = vm@s1.qcow2 -> vm.qcow2, then makes c.qcow2 on `layer` (not served: the
        name c is c@x's). Each control file of `commands` must refuse, naming `layer`, and
        leave the chain as it was; once c is gone a revert works."""
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "16M")
        qemu_io(self.img("vm.qcow2"), "write -P 6 0 2M")
        qemu_img("create", "-q", "-f", "qcow2", self.img("c@x.qcow2"), "16M")
        m = self.mount()
        self.assertEqual(control(m, "vm", "snapshot", "s1"), 0, m.read_log())
        with open(m.path("vm.raw"), "r+b") as f:
            f.write(b"7" * 70000)
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", layer, "-F", "qcow2",
                 self.img("c.qcow2"), "16M")
        for command in commands:
            self.assertEqual(control(m, "vm", command, "\n"), errno.EBUSY, m.read_log())
            self.assertIn(f"{layer} is also used by c.qcow2", m.read_log())
        self.assertEqual(chain(m, "vm"), ["vm@s1.qcow2", "vm.qcow2"])
        os.unlink(self.img("c.qcow2"))
        self.assertEqual(control(m, "vm", "revert", "\n"), 0, m.read_log())
        self.assertEqual(chain(m, "vm"), ["vm.qcow2"])
        m.stop()
        self.assertFalse(os.path.exists(self.img("vm@s1.qcow2")))
        self.assertEqual(check(self.img("vm.qcow2"))["exit"], 0)

    def test_revert_refuses_a_layer_an_unserved_image_uses(self):
        # c.qcow2, which this mount does not serve, is made on vm.qcow2 once that is vm's older
        # layer. Reverting vm would make vm.qcow2 its active layer and change c's content.
        self.refuses_edits_while_an_unserved_clone_uses("vm.qcow2", ["revert"])

    def test_revert_and_commit_refuse_a_top_an_unserved_image_uses(self):
        # c.qcow2 is made on vm's active layer, vm@s1.qcow2, while vm.raw is closed (a clone of
        # the image as it stands). Both a revert and a commit delete that layer.
        self.refuses_edits_while_an_unserved_clone_uses("vm@s1.qcow2", ["revert", "commit"])

    def slow_commit_over_a_middle_layer(self, clone):
        """Mounts vm = vm@s2 -> vm@s1 -> vm.qcow2 and starts a commit of both into vm.qcow2,
        slowed to a crawl; then makes `clone` on vm@s1 (not served yet). Returns the mount
        and what vm.raw showed."""
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "256M")
        m = self.mount()
        fd = os.open(m.path("vm.raw"), os.O_RDWR)
        os.pwrite(fd, b"1" * MiB, 0)
        self.assertEqual(control(m, "vm", "snapshot", "s1"), 0)
        for off in range(0, 32 * MiB, 4 * MiB):
            os.pwrite(fd, b"2" * (4 * MiB), off)
        self.assertEqual(control(m, "vm", "snapshot", "s2"), 0)
        # Enough to copy that the commit is still copying when the throttle below arrives,
        # in the sanitizer build too (32 MiB was copied before it there once, and the
        # switch then came before the clone was made).
        for off in range(0, 160 * MiB, 4 * MiB):
            os.pwrite(fd, b"3" * (4 * MiB), off)
        os.close(fd)
        with open(m.path("vm.raw"), "rb") as f:
            shown = f.read()
        self.assertEqual(control(m, "vm", "commit", "base=vm.qcow2"), 0, m.read_log())
        self.assertEqual(control(m, "vm", "job", "speed 1"), 0, "the commit ended too soon")
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "vm@s1.qcow2", "-F", "qcow2",
                 self.img(clone), "256M")
        return m, shown

    def test_commit_asks_for_unserved_users_again_before_the_switch(self):
        # A commit of vm@s2 and vm@s1 into vm.qcow2 deletes vm@s1 at the switch. A clone made on
        # vm@s1 while the commit runs (c.qcow2, not served here) would lose it: the switch must
        # refuse, and the chain stays as it was. (The clone still shows what it did: vm@s1
        # covers everything the commit copies into vm.qcow2.)
        qemu_img("create", "-q", "-f", "qcow2", self.img("c@x.qcow2"), "16M")
        m, shown = self.slow_commit_over_a_middle_layer("c.qcow2")
        self.assertEqual(control(m, "vm", "job", f"speed {1 << 40}"), 0, read_control(m, "vm", "job"))
        j = wait_job(m, "vm")
        self.assertIn("vm@s1.qcow2 is also used by c.qcow2", j["error"] or "", m.read_log())
        self.assertEqual(chain(m, "vm"), ["vm@s2.qcow2", "vm@s1.qcow2", "vm.qcow2"])
        with open(m.path("vm.raw"), "rb") as f:
            self.assertTrue(f.read() == shown)
        m.stop()
        clone = convert_raw(self.img("c.qcow2"))  # an empty layer: shows what vm@s1 does
        self.assertTrue(clone == convert_raw(self.img("vm@s1.qcow2")))
        self.assertEqual(clone[:MiB], b"2" * MiB)
        for name in ("vm@s2.qcow2", "vm@s1.qcow2", "vm.qcow2", "c.qcow2"):
            self.assertEqual(check(self.img(name))["exit"], 0, name)

    def test_a_rescan_does_not_serve_a_clone_of_a_layer_a_commit_changes(self):
        # The same clone, but a rescan would serve it: it would show the base taking in vm@s2
        # while the commit copies. It is exported only once the commit has ended (here it
        # refuses to switch, as above: the clone uses vm@s1).
        m, shown = self.slow_commit_over_a_middle_layer("d.qcow2")
        self.assertEqual(control(m, None, "rescan", "\n"), 0)
        self.assertFalse(os.path.exists(m.path("d.raw")), m.read_log())
        self.assertIn("d.qcow2: not exported while the commit of vm into vm.qcow2 runs",
                      m.read_log())
        self.assertEqual(control(m, "vm", "job", f"speed {1 << 40}"), 0, read_control(m, "vm", "job"))
        j = wait_job(m, "vm")
        self.assertIn("vm@s1.qcow2 is also used by d.qcow2", j["error"] or "", m.read_log())
        self.assertEqual(chain(m, "vm"), ["vm@s2.qcow2", "vm@s1.qcow2", "vm.qcow2"])
        self.assertEqual(control(m, None, "rescan", "\n"), 0)
        self.assertEqual(chain(m, "d"), ["d.qcow2", "vm@s1.qcow2", "vm.qcow2"])
        with open(m.path("d.raw"), "rb") as f:
            clone = f.read()
        with open(m.path("vm.raw"), "rb") as f:
            self.assertTrue(f.read() == shown)
        m.stop()
        self.assertTrue(clone == convert_raw(self.img("vm@s1.qcow2")))
        for name in ("vm@s2.qcow2", "vm@s1.qcow2", "vm.qcow2", "d.qcow2"):
            self.assertEqual(check(self.img(name))["exit"], 0, name)

class Cli(harness.ImageDirTest):
    def test_cli_wrappers(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "16M")
        m = self.mount()
        img = harness.IMGFS
        run([img, "snapshot", m.mountpoint, "vm", "s1"])
        p = run([img, "snapshot", m.mountpoint, "vm", "bad name"], check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("invalid snapshot name", p.stderr)
        p = run([img, "commit", m.mountpoint, "vm", "--wait"])
        self.assertIn("concluded", p.stdout)
        st = json.loads(run([img, "status", m.mountpoint, "--json"]).stdout)["images"]
        self.assertEqual(st[0]["name"], "vm")
        self.assertEqual(st[0]["job"]["type"], "commit")
        run([img, "snapshot", m.mountpoint, "vm", "s2"])
        run([img, "revert", m.mountpoint, "vm"])
        self.assertIn("vm.raw", run([img, "status", m.mountpoint]).stdout)
        m.stop()

    def test_each_cli_prints_its_own_reason_while_a_shell_is_refused(self):
        # A shell loop is refused over and over (a bad snapshot name) while the CLI is refused
        # for a reason of its own: each CLI run prints its own reason. The image's last error
        # is whoever failed last, and that used to be the shell most of the time.
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "16M")
        m = self.mount()
        snapshot = m.path(".control", "vm", "snapshot")
        shell = subprocess.Popen(["bash", "-c", f"while :; do echo bad/name > {snapshot}; done"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        try:
            printed = []
            for _ in range(40):
                p = run([harness.IMGFS, "commit", m.mountpoint, "vm"], check=False)
                self.assertNotEqual(p.returncode, 0)
                printed.append(p.stderr.strip())
        finally:
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait()
        info = m.info("vm")
        self.assertIn("invalid snapshot name",
                      info["last_error"] + "".join(info.get("caller_errors", {}).values()),
                      "the shell was never refused")
        wrong = [t for t in printed if "nothing to commit" not in t]
        self.assertEqual(wrong, [], f"{len(wrong)} of 40 runs printed another client's reason")
        m.stop()


class LayerLifecycle(harness.ImageDirTest):
    """Issue 12: a layer that leaves a chain is closed and unlocked at once; a chain changed on
    disk under the mount is reported, and operations on it stop before they touch anything."""

    def test_stream_closes_and_unlocks_what_it_dropped(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("base.qcow2"), "16M")
        qemu_io(self.img("base.qcow2"), "write -P 5 0 4M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                 self.img("vm.qcow2"), "16M")
        m = self.mount()
        self.assertEqual(harness.daemon_files(m), ["base.qcow2", "vm.qcow2"])
        self.assertEqual(control(m, "vm", "snapshot", "s1"), 0)
        fd = os.open(m.path("vm.raw"), os.O_RDWR)
        os.pwrite(fd, b"s" * 70000, 2 * MiB + 3)
        os.close(fd)
        run([harness.IMGFS, "stream", m.mountpoint, "vm", "--wait"])
        self.assertEqual(chain(m, "vm"), ["vm@s1.qcow2"])
        # vm.qcow2 (deleted) and base.qcow2 are no longer held...
        self.assertEqual(harness.daemon_files(m), ["vm@s1.qcow2"])
        # ...so the kept base can be locked and written by QEMU while the mount is up,
        qemu_io(self.img("base.qcow2"), "write -P 6 8M 4k")
        # and a rescan exports it (it is a root now) instead of finding it "in use".
        self.assertEqual(control(m, None, "rescan", "\n"), 0)
        self.assertEqual(m.exports(), ["base", "vm"])
        self.assertNotIn("in use by another process", m.read_log())
        m.stop()

    def test_commit_into_a_base_shorter_than_the_grown_image(self):
        # NAME.raw grown after a snapshot grows the top alone. A commit must grow the base to
        # the image's size first: the data past the base's old end stays, and NAME.raw keeps
        # its size.
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "16M")
        qemu_io(self.img("vm.qcow2"), "write -P 0x31 0 16M")
        m = self.mount()
        self.assertEqual(control(m, "vm", "snapshot", "s1"), 0)
        os.truncate(m.path("vm.raw"), 32 * MiB)
        fd = os.open(m.path("vm.raw"), os.O_RDWR)
        os.pwrite(fd, b"z" * MiB, 30 * MiB)
        os.close(fd)
        with open(m.path("vm.raw"), "rb") as f:
            shown = f.read()
        self.assertEqual(len(shown), 32 * MiB)
        self.assertEqual(control(m, "vm", "commit", "\n"), 0)
        self.assertIsNone(wait_job(m, "vm")["error"], m.read_log())
        self.assertEqual(chain(m, "vm"), ["vm.qcow2"])
        self.assertEqual(os.stat(m.path("vm.raw")).st_size, 32 * MiB)
        with open(m.path("vm.raw"), "rb") as f:
            self.assertTrue(f.read() == shown)
        m.stop()
        self.assertIn("virtual size: 32 MiB", run(["qemu-img", "info", self.img("vm.qcow2")]).stdout)
        self.assertEqual(check(self.img("vm.qcow2"))["exit"], 0)
        self.assertTrue(convert_raw(self.img("vm.qcow2")) == shown)

    def test_commit_into_a_base_longer_than_the_image_is_refused(self):
        # vm.qcow2 (16M) lies on base.qcow2 (32M of data). After the switch the disk would be
        # the base's 32M, showing its old bytes past the end the guest knew.
        qemu_img("create", "-q", "-f", "qcow2", self.img("base.qcow2"), "32M")
        qemu_io(self.img("base.qcow2"), "write -P 0x44 0 32M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                 self.img("vm.qcow2"), "16M")
        m = self.mount()
        self.assertEqual(control(m, "vm", "commit", "\n"), errno.EINVAL, m.read_log())
        self.assertIn("base.qcow2 (33554432 bytes) is larger than the disk (16777216 bytes)",
                      m.read_log())
        self.assertEqual(chain(m, "vm"), ["vm.qcow2", "base.qcow2"])
        self.assertEqual(os.stat(m.path("vm.raw")).st_size, 16 * MiB)
        m.stop()

    def test_commit_grows_a_base_over_a_longer_backing_file_with_zeros(self):
        # The base (16M) lies on a longer golden image (32M of data). The image read zeros past
        # the base's end; grown by the commit, the base must read zeros there too, not the
        # golden image's data.
        qemu_img("create", "-q", "-f", "qcow2", self.img("golden.qcow2"), "32M")
        qemu_io(self.img("golden.qcow2"), "write -P 0x44 0 32M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "golden.qcow2", "-F", "qcow2",
                 self.img("vm.qcow2"), "16M")
        m = self.mount()
        self.assertEqual(control(m, "vm", "snapshot", "s1"), 0)
        os.truncate(m.path("vm.raw"), 32 * MiB)
        with open(m.path("vm.raw"), "rb") as f:
            shown = f.read()
        self.assertTrue(shown == b"\x44" * (16 * MiB) + bytes(16 * MiB))
        self.assertEqual(control(m, "vm", "commit", "\n"), 0)
        self.assertIsNone(wait_job(m, "vm")["error"], m.read_log())
        with open(m.path("vm.raw"), "rb") as f:
            self.assertTrue(f.read() == shown)
        m.stop()
        self.assertEqual(check(self.img("vm.qcow2"))["exit"], 0)
        self.assertTrue(convert_raw(self.img("vm.qcow2")) == shown)

    def test_commit_past_a_shorter_middle_layer_keeps_its_zeros(self):
        # vm@s1 (16M) lies between a 32M top and a 32M base full of data. The image reads
        # zeros past vm@s1's end, where the base still holds data: a commit of both into the
        # base must write those zeros, or the switch would bring the base's old bytes back.
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "32M")
        qemu_io(self.img("vm.qcow2"), "write -P 0x44 0 32M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "vm.qcow2", "-F", "qcow2",
                 self.img("vm@s1.qcow2"), "16M")
        qemu_io(self.img("vm@s1.qcow2"), "write -P 0x45 1M 1M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "vm@s1.qcow2", "-F", "qcow2",
                 self.img("vm@s2.qcow2"), "32M")
        qemu_io(self.img("vm@s2.qcow2"), "write -P 0x46 20M 1M")
        m = self.mount()
        self.assertEqual(chain(m, "vm"), ["vm@s2.qcow2", "vm@s1.qcow2", "vm.qcow2"])
        with open(m.path("vm.raw"), "rb") as f:
            shown = f.read()
        self.assertTrue(shown[17 * MiB:18 * MiB] == bytes(MiB))
        self.assertEqual(control(m, "vm", "commit", "base=vm.qcow2\n"), 0)
        self.assertIsNone(wait_job(m, "vm")["error"], m.read_log())
        self.assertEqual(chain(m, "vm"), ["vm.qcow2"])
        with open(m.path("vm.raw"), "rb") as f:
            self.assertTrue(f.read() == shown)
        m.stop()
        self.assertEqual(check(self.img("vm.qcow2"))["exit"], 0)
        self.assertTrue(convert_raw(self.img("vm.qcow2")) == shown)

    def test_layers_reached_through_symbolic_links_inside_the_directory(self):
        # base.qcow2 is a link to bases/deb12.qcow2 and vm.qcow2 names the link: the served
        # layer is the link's target, and jobs must recognise it as the file its name shows.
        os.mkdir(self.img("bases"))
        qemu_img("create", "-q", "-f", "qcow2", self.img("bases/deb12.qcow2"), "8M")
        qemu_io(self.img("bases/deb12.qcow2"), "write -P 0x51 0 8M")
        os.symlink("bases/deb12.qcow2", self.img("base.qcow2"))
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                 self.img("vm.qcow2"), "8M")
        m = self.mount()
        self.assertEqual(chain(m, "vm"), ["vm.qcow2", "base.qcow2"])
        with open(m.path("vm.raw"), "r+b") as f:
            f.write(b"\x52" * MiB)
        self.assertEqual(control(m, "vm", "snapshot", "s1\n"), 0, m.read_log())
        self.assertEqual(chain(m, "vm"), ["vm@s1.qcow2", "vm.qcow2", "base.qcow2"])
        self.assertEqual(control(m, "vm", "commit", "base=vm.qcow2\n"), 0, m.read_log())
        self.assertIsNone(wait_job(m, "vm")["error"], m.read_log())
        self.assertEqual(chain(m, "vm"), ["vm.qcow2", "base.qcow2"])
        self.assertEqual(control(m, "vm", "snapshot", "s2\n"), 0, m.read_log())
        with open(m.path("vm.raw"), "r+b") as f:
            f.seek(4 * MiB)
            f.write(b"\x53" * MiB)
        self.assertEqual(control(m, "vm", "commit", "base=base.qcow2\n"), 0, m.read_log())
        self.assertIsNone(wait_job(m, "vm")["error"], m.read_log())
        self.assertEqual(chain(m, "vm"), ["base.qcow2"])
        with open(m.path("vm.raw"), "rb") as f:
            shown = f.read()
        self.assertTrue(shown == b"\x52" * MiB + b"\x51" * (3 * MiB) + b"\x53" * MiB +
                        b"\x51" * (3 * MiB))
        m.stop()
        self.assertTrue(os.path.islink(self.img("base.qcow2")))
        self.assertEqual(check(self.img("bases/deb12.qcow2"))["exit"], 0)
        self.assertTrue(convert_raw(self.img("bases/deb12.qcow2")) == shown)

    def test_an_immutable_base_is_served_read_only(self):
        # A golden base the daemon may not open for writing (chattr +i: even root gets EPERM)
        # is served read-only: the image on it works, and a commit into it is refused.
        harness.require_tools("chattr")
        qemu_img("create", "-q", "-f", "qcow2", self.img("base.qcow2"), "8M")
        qemu_io(self.img("base.qcow2"), "write -P 0x61 0 8M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                 self.img("vm.qcow2"), "8M")
        run(["chattr", "+i", self.img("base.qcow2")])
        self.addCleanup(run, ["chattr", "-i", self.img("base.qcow2")])
        m = self.mount()
        self.assertIn("base.qcow2: opened read-only", m.read_log())
        self.assertEqual(chain(m, "vm"), ["vm.qcow2", "base.qcow2"])
        with open(m.path("vm.raw"), "r+b") as f:
            f.write(b"\x62" * MiB)
        self.assertEqual(control(m, "vm", "snapshot", "s1\n"), 0, m.read_log())
        self.assertEqual(control(m, "vm", "commit", "base=base.qcow2\n"), errno.EROFS,
                         m.read_log())
        self.assertIn("base.qcow2 is opened read-only by this mount", m.read_log())
        self.assertEqual(control(m, "vm", "commit", "base=vm.qcow2\n"), 0, m.read_log())
        self.assertIsNone(wait_job(m, "vm")["error"], m.read_log())
        with open(m.path("vm.raw"), "rb") as f:
            shown = f.read()
        self.assertTrue(shown == b"\x62" * MiB + b"\x61" * (7 * MiB))
        m.stop()
        self.assertTrue(convert_raw(self.img("vm.qcow2")) == shown)
        self.assertEqual(check(self.img("vm.qcow2"))["exit"], 0)

    def test_commit_completes_under_a_steady_hole_puncher(self):
        # A client punching holes all the time (fstrim, a filesystem mounted with -o discard)
        # while a commit runs: a punch is a zeroing write for the commit (copied, or mirrored
        # in sync mode). The commit must finish without an error, and every hole must read
        # as zeros in the base afterwards.
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "64M")
        m = self.mount()
        fd = os.open(m.path("vm.raw"), os.O_RDWR)
        for off in range(0, 48 * MiB, 4 * MiB):
            os.pwrite(fd, b"a" * (4 * MiB), off)
        self.assertEqual(control(m, "vm", "snapshot", "s1"), 0)
        for off in range(0, 32 * MiB, 4 * MiB):
            os.pwrite(fd, b"b" * (4 * MiB), off)
        model = bytearray(os.pread(fd, 64 * MiB, 0))
        stop = threading.Event()
        punches = []

        def punch():
            rng = random.Random(5)
            while not stop.is_set():
                off = rng.randrange(0, 64 * MiB // (64 << 10)) * (64 << 10)
                punch_hole(fd, off, 64 << 10)
                model[off:off + (64 << 10)] = bytes(64 << 10)
                punches.append(off)

        puncher = threading.Thread(target=punch)
        puncher.start()
        try:
            time.sleep(0.2)
            self.assertEqual(control(m, "vm", "commit", "\n"), 0)
            j = wait_job(m, "vm", timeout=120)
            time.sleep(0.2)
        finally:
            stop.set()
            puncher.join()
        self.assertIsNone(j["error"], m.read_log())
        self.assertEqual(chain(m, "vm"), ["vm.qcow2"])
        self.assertTrue(os.pread(fd, 64 * MiB, 0) == model)
        os.close(fd)
        m.stop()
        self.assertGreater(len(punches), 100)
        self.assertEqual(check(self.img("vm.qcow2"))["exit"], 0)
        self.assertTrue(convert_raw(self.img("vm.qcow2")) == model)

    def test_cancelled_commit_then_commit_leaves_nothing_open(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "256M")
        m = self.mount()
        self.assertEqual(control(m, "vm", "snapshot", "s1"), 0)
        fd = os.open(m.path("vm.raw"), os.O_RDWR)
        # Enough that the throttle and the cancel find the commit still copying, in the
        # sanitizer build too (see slow_commit_over_a_middle_layer).
        for off in range(0, 160 * MiB, 4 * MiB):
            os.pwrite(fd, b"c" * (4 * MiB), off)
        os.close(fd)
        self.assertEqual(control(m, "vm", "commit", "\n"), 0)
        self.assertEqual(control(m, "vm", "job", "speed 1"), 0, "the commit ended too soon")
        self.assertEqual(control(m, "vm", "job", "cancel"), 0)
        self.assertEqual(wait_job(m, "vm")["error"], "cancelled")
        self.assertEqual(control(m, "vm", "commit", "\n"), 0)
        self.assertIsNone(wait_job(m, "vm")["error"])
        self.assertEqual(harness.daemon_files(m), ["vm.qcow2"])  # no "vm@s1.qcow2 (deleted)"
        m.stop()

    def test_deleted_middle_layer_is_reported_and_stops_a_stream(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("big.qcow2"), "64M")
        m = self.mount()
        fd = os.open(m.path("big.raw"), os.O_RDWR)
        os.pwrite(fd, b"1" * MiB, 0)
        self.assertEqual(control(m, "big", "snapshot", "s1"), 0)
        os.pwrite(fd, b"2" * MiB, MiB)
        self.assertEqual(control(m, "big", "snapshot", "g1"), 0)
        os.pwrite(fd, b"3" * MiB, 2 * MiB)
        os.close(fd)
        with open(m.path("big.raw"), "rb") as f:
            shown = f.read()
        os.unlink(self.img("big@s1.qcow2"))
        self.assertEqual(control(m, None, "rescan", "\n"), 0)
        self.assertEqual(m.exports(), ["big"])
        self.assertEqual(m.info("big")["chain_mismatch"], "big@s1.qcow2 is missing on disk")
        self.assertIn("big@s1.qcow2 is missing on disk", m.read_log())
        status = run([harness.IMGFS, "status", m.mountpoint, "big"]).stdout
        self.assertIn("chain on disk differs: big@s1.qcow2 is missing on disk", status)
        p = run([harness.IMGFS, "stream", m.mountpoint, "big", "--wait"], check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("the chain on disk differs", p.stderr)
        self.assertEqual([f for f in os.listdir(self.dir) if f.startswith(".imgfs-")], [])
        info = json.loads(run(["qemu-img", "info", "-U", "--output=json",
                               self.img("big@g1.qcow2")]).stdout)
        self.assertEqual(info["backing-filename"], "big@s1.qcow2")  # not rewritten
        with open(m.path("big.raw"), "rb") as f:
            self.assertTrue(f.read() == shown)  # still served from the open files
        m.stop()


class Kills(harness.ImageDirTest):
    """kill -9 at random points during each kind of job: the directory reopens with the content
    from before or after, and qemu-img check finds no corruption."""

    # 10 runs per job kind; long mode (IMGFS_LONG=1) runs 50.
    RUNS = int(os.environ.get("IMGFS_KILL_RUNS", "50" if os.environ.get("IMGFS_LONG") else "10"))

    def setup_chain(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "64M")
        qemu_io(self.img("vm.qcow2"), "write -P 1 0 24M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "vm.qcow2", "-F", "qcow2", self.img("vm@s1.qcow2"), "64M")
        qemu_io(self.img("vm@s1.qcow2"), "write -P 2 4M 12M", "write -P 3 30M 6M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "vm@s1.qcow2", "-F", "qcow2", self.img("vm@s2.qcow2"), "64M")
        qemu_io(self.img("vm@s2.qcow2"), "write -P 4 10M 8M")

    def verify(self, allowed, what, i):
        m = self.mount()
        try:
            self.assertEqual(m.exports(), ["vm"], f"{what} run {i}: {m.read_log()}")
            with open(m.path("vm.raw"), "rb") as f:
                data = f.read()
        finally:
            m.stop()
            self.mounts.remove(m)
        self.assertTrue(any(data == a for a in allowed), f"{what} run {i}: content is neither before nor after")
        # The reopen removes whatever the killed daemon left half made.
        leftovers = [f for f in os.listdir(self.dir) if f.startswith(".imgfs-")]
        self.assertEqual(leftovers, [], f"{what} run {i}")
        for f in os.listdir(self.dir):
            if f.endswith(".qcow2"):
                c = check(self.img(f))
                self.assertEqual((c["corruptions"], c["check-errors"]), (0, 0), f"{what} run {i} {f}: {c['text']}")

    def kill_during(self, what, command, speed=None, after=None):
        # The same kill points every run (str hashes differ per Python process).
        rng = random.Random(zlib.crc32(what.encode()))
        for i in range(self.RUNS):
            for f in os.listdir(self.dir):
                os.unlink(self.img(f))
            self.setup_chain()
            before = convert_raw(self.img("vm@s2.qcow2"))
            allowed = [before] + ([after(self)] if after else [])
            m = self.mount()
            if speed:
                self.assertEqual(control(m, "vm", command, "\n"), 0)
                control(m, "vm", "job", f"speed {speed}")
                time.sleep(rng.uniform(0.05, 2.0))
            else:
                t = threading.Thread(target=control, args=(m, "vm", command, "kill1" if command == "snapshot" else "\n"))
                t.start()
                time.sleep(rng.uniform(0, 0.05))
            m.kill()
            self.mounts.remove(m)
            if not speed:
                t.join()
            self.verify(allowed, what, i)

    def test_kill_during_commit(self):
        self.kill_during("commit", "commit", speed=16 * MiB)

    def test_kill_during_stream(self):
        self.kill_during("stream", "stream", speed=16 * MiB)

    def test_kill_during_snapshot(self):
        self.kill_during("snapshot", "snapshot")

    def test_kill_during_revert(self):
        self.kill_during("revert", "revert", after=lambda s: convert_raw(s.img("vm@s1.qcow2")))


if __name__ == "__main__":
    harness.main()
