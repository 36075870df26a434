#!/usr/bin/env python3
"""Full disks under load: the image directory runs out of space while many requests are in flight.

Every scenario ends the same way: `qemu-img check` finds no corruption in any layer (leaks are
allowed), every byte the guest had acknowledged reads back (through the live mount and after a
remount), and a guest filesystem passes e2fsck after its journal replay, as after a power cut.

  fill_ext4   The reproduction from the field: the image directory on a 200 MB tmpfs, a 1 GiB
              qcow2 with ext4 on it through a loop device, 50 MB written and synced, a live
              snapshot (or none), then 300 MB written into the filesystem until the host disk
              is full; sync, unmount. 64 KiB and 2 MiB clusters, with and without extended L2.
  small_fs    The same with the image directory on a small loop-mounted ext4 and xfs, where
              space runs out inside a real block filesystem (delayed allocation, writeback).
  randwrite   32 writers at once (O_DIRECT, 4 KiB, random) into a fresh overlay over a backing
              file full of data, until the disk is full; fio's randwrite at queue depth 32 the
              same way. Then space is freed (no remount): every write must succeed again, and
              status and info must have shown the condition and its end.
  jobs        A live snapshot and an active commit while writers fill the disk: refused or
              failed cleanly, never a chain that disagrees with the files.

IMGFS_LONG=1 runs every fill_ext4 configuration 20 times (CI: 2); IMGFS_EXHAUSTION_RUNS=N
overrides it. One summary line at the end: `exhaustion: N checks run, P passed`.
"""

import errno
import hashlib
import json
import mmap
import os
import random
import tempfile
import threading
import time

import harness
from harness import run, qemu_img, check, convert_raw

KiB = 1 << 10
MiB = 1 << 20
BLOCK = 4 * KiB
SECTOR = 512

LONG = os.environ.get("IMGFS_LONG", "") not in ("", "0")
RUNS = int(os.environ.get("IMGFS_EXHAUSTION_RUNS", "20" if LONG else "2"))


def block_data(block, gen):
    """Content of `block` after its writer's generation `gen` (gen 0: never written by us)."""
    seed = hashlib.sha256(f"{block}:{gen}".encode()).digest()
    return seed * (BLOCK // len(seed))


class Tmpfs:
    def __init__(self, path, size):
        self.path = path
        run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path])

    def close(self):
        run(["umount", self.path], check=False)


class SmallFs:
    """A small ext4 or xfs filesystem on a loop device (its backing file in /var/tmp)."""

    def __init__(self, path, kind, size_mb):
        self.path = path
        fd, self.backing = tempfile.mkstemp(prefix="imgfs-smallfs-", dir="/var/tmp")
        os.close(fd)
        os.truncate(self.backing, size_mb * MiB)
        self.loop = run(["losetup", "-f", "--show", self.backing]).stdout.strip()
        mkfs = ["mkfs.ext4", "-q", "-F"] if kind == "ext4" else ["mkfs.xfs", "-q", "-f"]
        run(mkfs + [self.loop])
        run(["mount", self.loop, path])

    def close(self):
        run(["umount", self.path], check=False)
        run(["losetup", "-d", self.loop], check=False)
        os.unlink(self.backing)


class Writers:
    """`threads` writers at once on one file, O_DIRECT, BLOCK bytes at random blocks of the
    file's first `blocks` blocks. Writer i owns the blocks b with b % threads == i, so each
    block's writes are ordered and the expected content is exact: after a successful write its
    generation; after a failed one that write or anything before it (per sector, as a failed
    write may land in part). Each writer fsyncs now and then; what a successful fsync covered
    must survive a remount."""

    def __init__(self, path, blocks, threads=32, seed=1):
        self.path = path
        self.blocks = blocks
        self.threads = threads
        self.seed = seed
        # Per block: generations that may be on disk now (the first is the last that
        # succeeded, 0 = the content before we wrote), and the generations that may be there
        # after a remount (from the last fsync-covered one on).
        self.live = {}
        self.durable = {}
        self.gen = {}
        self.ok = 0
        self.failed = 0
        self.errnos = {}
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.crashed = []  # what a writer thread raised: its test fails (see run)

    def _worker(self, index, seconds, stop_on_error, max_writes, pause):
        try:
            self._write(index, seconds, stop_on_error, max_writes, pause)
        except BaseException as e:  # a thread's exception would only be printed
            with self.lock:
                self.crashed.append(f"writer {index}: {e!r}")

    def _write(self, index, seconds, stop_on_error, max_writes, pause):
        rng = random.Random(self.seed * 1000 + index)
        fd = os.open(self.path, os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, BLOCK)
        pending = []  # (block, gen) written since the last fsync
        deadline = time.time() + seconds
        mine = [b for b in range(index, self.blocks, self.threads)]
        writes = 0
        try:
            while (time.time() < deadline and not self.stop.is_set() and mine and
                   writes < max_writes):
                writes += 1
                if pause:
                    time.sleep(pause)
                block = rng.choice(mine)
                with self.lock:
                    gen = self.gen.get(block, 0) + 1
                    self.gen[block] = gen
                buf.seek(0)
                buf.write(block_data(block, gen))
                try:
                    os.pwrite(fd, buf, block * BLOCK)
                    good = True
                except OSError as e:
                    good = False
                    with self.lock:
                        self.errnos[e.errno] = self.errnos.get(e.errno, 0) + 1
                with self.lock:
                    if good:
                        self.ok += 1
                        self.live[block] = [gen]
                    else:
                        self.failed += 1
                        self.live.setdefault(block, [0]).append(gen)
                    self.durable.setdefault(block, [0]).append(gen)
                pending.append(block)
                if not good and stop_on_error:
                    self.stop.set()
                if rng.random() < 0.02:
                    try:
                        os.fsync(fd)
                        synced = True
                    except OSError:
                        synced = False
                    if synced:
                        # The fsync covers every write this writer finished before it.
                        with self.lock:
                            for b in pending:
                                self.durable[b] = list(self.live[b])
                        pending = []
        finally:
            os.close(fd)
            buf.close()

    def run(self, seconds, stop_on_error=False, max_writes=1 << 30, pause=0.0):
        self.stop.clear()
        ts = [threading.Thread(target=self._worker,
                               args=(i, seconds, stop_on_error, max_writes, pause))
              for i in range(self.threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if self.crashed:
            raise AssertionError(f"writer threads failed: {self.crashed}")

    def verify(self, path, durable_only, before):
        """Checks every block we wrote; `before(block)` is its content before (gen 0)."""
        table = self.durable if durable_only else self.live
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, BLOCK)
        try:
            for block, gens in sorted(table.items()):
                os.preadv(fd, [buf], block * BLOCK)
                got = bytes(buf)
                options = [block_data(block, g) if g else before(block) for g in gens]
                for s in range(0, BLOCK, SECTOR):
                    if not any(got[s:s + SECTOR] == o[s:s + SECTOR] for o in options):
                        raise AssertionError(
                            f"block {block} sector {s // SECTOR} holds none of generations "
                            f"{gens} ({'after remount' if durable_only else 'live'})")
        finally:
            os.close(fd)
            buf.close()


def checked_layers(test, directory):
    """qemu-img check on every qcow2 in `directory`: no corruption (leaks allowed)."""
    names = sorted(n for n in os.listdir(directory) if n.endswith(".qcow2"))
    for n in names:
        c = check(os.path.join(directory, n))
        test.assertEqual(c["corruptions"], 0, f"{n}: {c['text']}")
        test.assertEqual(c["check-errors"], 0, f"{n}: {c['text']}")
        test.assertIn(c["exit"], (0, 3), f"{n}: {c['text']}")
    return names


class ExhaustionTest(harness.ImageDirTest):
    def setUp(self):
        super().setUp()
        self.fs = []
        self.loops = []

    def tearDown(self):
        for loop in self.loops:
            run(["umount", "-l", loop], check=False)
            run(["losetup", "-d", loop], check=False)
        for m in self.mounts:
            harness.detach_loops_under(m.mountpoint)
            m.cleanup()
        self.mounts = []
        for fs in reversed(self.fs):
            fs.close()
        super().tearDown()

    def loop(self, path):
        dev = run(["losetup", "-f", "--show", path]).stdout.strip()
        self.loops.append(dev)
        return dev

    def unloop(self, dev):
        run(["losetup", "-d", dev])
        self.loops.remove(dev)

    # ---- fill_ext4 and small_fs ----

    def fill_ext4(self, cluster, extl2, snapshot, seed):
        """The reproduction; returns a description of what happened, for the log."""
        imgs = self.dir
        fsdir = tempfile.mkdtemp(prefix="imgfs-guestfs-")
        try:
            run([harness.IMGFS, "create", "-o",
                 f"cluster_size={cluster},extended_l2={'on' if extl2 else 'off'}",
                 os.path.join(imgs, "vm.qcow2"), "1G"])
            # Space to give back after the fill: e2fsck's journal replay needs to write.
            ballast = os.path.join(imgs, "ballast")
            with open(ballast, "wb") as f:
                f.write(bytes(16 * MiB))
            m = self.mount()
            dev = self.loop(m.path("vm.raw"))
            run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=1", dev])
            run(["mount", dev, fsdir])
            rng = random.Random(seed)
            first = rng.randbytes(50 * MiB)
            with open(os.path.join(fsdir, "first"), "wb") as f:
                f.write(first)
            run(["sync"])
            if snapshot:
                run([harness.IMGFS, "snapshot", m.mountpoint, "vm", "s1"])
            # Fill: 300 MB, more than the host has left. The guest sees I/O errors.
            p = run(f"dd if=/dev/urandom of={fsdir}/second bs=1M count=300 conv=fsync "
                    f"status=none", check=False)
            run(["sync"], check=False)
            info = m.info("vm")
            self.assertTrue(p.returncode != 0 or info.get("io_error") is not None,
                            f"the host disk never filled: dd rc {p.returncode}, {info}")
            run(["umount", fsdir], check=False)
            os.unlink(ballast)
            e2 = run(["e2fsck", "-fy", dev], check=False)
            self.assertIn(e2.returncode, (0, 1), f"e2fsck after the fill:\n{e2.stdout}")
            self.unloop(dev)
            m.stop()
            layers = checked_layers(self, imgs)
            # Remount: the filesystem mounts, the synced file reads back.
            m = self.mount()
            dev = self.loop(m.path("vm.raw"))
            e2 = run(["e2fsck", "-fn", dev], check=False)
            self.assertEqual(e2.returncode, 0, f"e2fsck after the remount:\n{e2.stdout}")
            run(["mount", "-o", "ro", dev, fsdir])
            with open(os.path.join(fsdir, "first"), "rb") as f:
                self.assertTrue(f.read() == first, "the file synced before the fill changed")
            run(["umount", fsdir])
            self.unloop(dev)
            m.stop()
            checked_layers(self, imgs)
            return (f"dd rc {p.returncode}, io_error {info.get('io_error')}, layers {layers}")
        finally:
            run(["umount", fsdir], check=False)
            os.rmdir(fsdir)

    def test_fill_ext4(self):
        harness.require_tools("losetup", "mkfs.ext4", "e2fsck")
        n = 0
        for cluster in (64 * KiB, 2 * MiB):
            for extl2 in (False, True):
                for snapshot in (True, False):
                    for r in range(RUNS):
                        with self.subTest(cluster=cluster, extl2=extl2, snapshot=snapshot, run=r):
                            tmp = Tmpfs(self.dir, "200m")
                            try:
                                what = self.fill_ext4(cluster, extl2, snapshot, seed=r)
                                n += 1
                                print(f"  fill_ext4 cluster={cluster} extl2={extl2} "
                                      f"snapshot={snapshot} run={r}: {what}", flush=True)
                            finally:
                                for m in self.mounts:
                                    harness.detach_loops_under(m.mountpoint)
                                    m.cleanup()
                                self.mounts = []
                                for loop in list(self.loops):
                                    run(["losetup", "-d", loop], check=False)
                                    self.loops.remove(loop)
                                tmp.close()
        print(f"  fill_ext4: {n} runs passed", flush=True)

    def test_small_fs(self):
        harness.require_tools("losetup", "mkfs.ext4", "mkfs.xfs", "e2fsck")
        for kind in ("ext4", "xfs"):
            with self.subTest(fs=kind):
                small = SmallFs(self.dir, kind, 320)
                try:
                    what = self.fill_ext4(64 * KiB, True, True, seed=7)
                    print(f"  small_fs {kind}: {what}", flush=True)
                finally:
                    for m in self.mounts:
                        harness.detach_loops_under(m.mountpoint)
                        m.cleanup()
                    self.mounts = []
                    for loop in list(self.loops):
                        run(["losetup", "-d", loop], check=False)
                        self.loops.remove(loop)
                    small.close()

    # ---- randwrite ----

    def make_backed_overlay(self, base_mb, virtual_mb, seed):
        """base.qcow2 full of data (base_mb), vm.qcow2 a fresh overlay on it; returns a function
        giving a block's backing content."""
        fd, raw = tempfile.mkstemp(prefix="imgfs-base-", dir="/var/tmp")  # not on the small fs
        os.close(fd)
        rng = random.Random(seed)
        with open(raw, "wb") as f:
            f.write(rng.randbytes(base_mb * MiB))
        qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, self.img("base.qcow2"))
        qemu_img("resize", "-q", self.img("base.qcow2"), f"{virtual_mb}M")
        with open(raw, "rb") as f:
            data = f.read()
        os.unlink(raw)
        run([harness.IMGFS, "create", "-b", "base.qcow2", "-F", "qcow2", self.img("vm.qcow2")])

        def before(block):
            chunk = data[block * BLOCK:(block + 1) * BLOCK]
            return chunk + bytes(BLOCK - len(chunk))
        return before

    def test_randwrite_until_full_then_free(self):
        tmp = Tmpfs(self.dir, "136m")
        self.fs.append(tmp)
        before = self.make_backed_overlay(96, 128, seed=3)
        ballast = self.img("ballast")
        with open(ballast, "wb") as f:
            f.write(bytes(16 * MiB))
        m = self.mount()
        w = Writers(m.path("vm.raw"), blocks=128 * MiB // BLOCK, threads=32, seed=5)
        # Until the disk is full and a good number of writes have failed.
        deadline = time.time() + 60
        while w.failed < 200 and time.time() < deadline:
            w.run(seconds=2)
        self.assertGreater(w.failed, 0, "the disk never filled")
        self.assertIn(errno.ENOSPC, w.errnos, f"errors seen: {w.errnos}")
        info = m.info("vm")
        self.assertIsNotNone(info.get("io_error"), json.dumps(info))
        self.assertEqual(info["io_error"]["errno"], "ENOSPC", json.dumps(info))
        self.assertTrue(info["io_error"]["ongoing"], json.dumps(info))
        status = run([harness.IMGFS, "status", m.mountpoint]).stdout
        self.assertIn("ENOSPC", status)
        w.verify(m.path("vm.raw"), False, before)  # reads go on, and show what was acked
        # Space comes back: writes work again without a remount.
        # A bounded number of writes, so that the writers do not fill the freed space again.
        os.unlink(ballast)
        failed, ok = w.failed, w.ok
        w.run(seconds=10, max_writes=8)
        self.assertEqual(w.failed, failed, f"writes still fail after freeing space: {w.errnos}")
        self.assertEqual(w.ok - ok, w.threads * 8, "not every writer wrote after freeing space")
        self.assertEqual(m.info("vm")["io_error"]["failed_requests"],
                         info["io_error"]["failed_requests"])
        w.verify(m.path("vm.raw"), False, before)
        m.stop()
        checked_layers(self, self.dir)
        m = self.mount()
        w.verify(m.path("vm.raw"), True, before)
        m.stop()
        print(f"  randwrite: {w.ok} writes ok, {w.failed} failed {w.errnos}", flush=True)

    def test_fio_randwrite_qd32_until_full(self):
        harness.require_tools("fio")
        tmp = Tmpfs(self.dir, "120m")
        self.fs.append(tmp)
        self.make_backed_overlay(96, 128, seed=4)
        m = self.mount()
        p = run(["fio", "--name=fill", f"--filename={m.path('vm.raw')}", "--rw=randwrite",
                 "--bs=4k", "--iodepth=32", "--ioengine=io_uring", "--direct=1",
                 "--size=128M", "--time_based", "--runtime=8", "--continue_on_error=all",
                 "--output-format=json"], check=False)
        info = m.info("vm")
        self.assertIsNotNone(info.get("io_error"), f"the disk never filled; fio:\n{p.stdout}")
        m.stop()
        checked_layers(self, self.dir)
        # After the fill, imgfs serves the bytes QEMU reads from the same chain: the backing's
        # data where the overlay has none, and whatever each write left.
        expected = convert_raw(self.img("vm.qcow2"))
        m = self.mount()
        with open(m.path("vm.raw"), "rb") as f:
            served = f.read()
        m.stop()
        self.assertTrue(served == expected, "imgfs and qemu-img read the chain differently")
        print(f"  fio randwrite qd32: io_error {info['io_error']}", flush=True)

    # ---- jobs ----

    def test_snapshot_and_commit_while_the_disk_fills(self):
        # base.qcow2 holds data in its first 64 MB; the writers write over 96 MB, so a commit
        # allocates in the base too. About 28 MB are free when the writers start: at their
        # pace that lasts a second or two, long enough for snapshots and commits to start.
        tmp = Tmpfs(self.dir, "100m")
        self.fs.append(tmp)
        before = self.make_backed_overlay(64, 96, seed=6)
        ballast = self.img("ballast")
        with open(ballast, "wb") as f:
            f.write(bytes(8 * MiB))
        m = self.mount()
        w = Writers(m.path("vm.raw"), blocks=96 * MiB // BLOCK, threads=16, seed=9)
        writer = threading.Thread(target=w.run, kwargs={"seconds": 8, "pause": 0.004})
        writer.start()
        results = []
        try:
            time.sleep(0.2)
            for i in range(8):
                s = run([harness.IMGFS, "snapshot", m.mountpoint, "vm", f"s{i}"], check=False)
                results.append(("snapshot", s.returncode, s.stderr.strip()))
                c = run([harness.IMGFS, "commit", m.mountpoint, "vm", "--wait"], check=False)
                results.append(("commit", c.returncode, c.stderr.strip()))
                time.sleep(0.2)
        finally:
            writer.join()
        # How many jobs succeed while the disk fills depends on the machine's pace (on a fast
        # one the disk is full before the first commit starts), so only their errors are held
        # to a standard here; once space is back, a snapshot and a commit must succeed.
        done = {k: sum(1 for kind, rc, _ in results if kind == k and rc == 0)
                for k in ("snapshot", "commit")}
        self.assertGreater(w.failed, 0, f"the disk never filled: {results}")
        for kind, rc, err in results:
            if rc != 0:
                self.assertTrue(any(e in err for e in ("space", "ENOSPC", "free", "busy", "EBUSY",
                                                        "Input/output")),
                                f"{kind} failed with an unclear reason: {err}")
        w.verify(m.path("vm.raw"), False, before)
        os.unlink(ballast)
        failed, ok = w.failed, w.ok
        w.run(seconds=10, max_writes=8)
        self.assertEqual(w.failed, failed, f"writes still fail after freeing space: {w.errnos}")
        self.assertEqual(w.ok - ok, w.threads * 8, "not every writer wrote after freeing space")
        for argv in (["snapshot", m.mountpoint, "vm", "after"], ["commit", m.mountpoint, "vm",
                                                                 "--wait"]):
            r = run([harness.IMGFS, *argv], check=False)
            self.assertEqual(r.returncode, 0, f"{argv[0]} after freeing space: {r.stderr}")
        # The served chain is the chain the files describe.
        info = m.info("vm")
        served = [l["file"] for l in info["layers"]]
        m.stop()
        layers = checked_layers(self, self.dir)
        top = served[0]
        out = qemu_img("info", "--backing-chain", "--output=json", self.img(top)).stdout
        on_disk = [os.path.basename(i["filename"]) for i in json.loads(out)]
        self.assertEqual(served, on_disk)
        m = self.mount()
        w.verify(m.path("vm.raw"), True, before)
        m.stop()
        print(f"  jobs while full: {done} succeeded of {len(results)}, writes {w.ok} ok, "
              f"{w.failed} failed; layers {layers}; {results}", flush=True)


if __name__ == "__main__":
    harness.main_with_summary("exhaustion")
