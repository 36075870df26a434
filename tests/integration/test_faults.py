#!/usr/bin/env python3
"""Fault injection through the mount (issue 6, item 4), with the debug mount option faults=FILE.

Matrix: EIO and ENOSPC, `once` and `always`, injected at the file I/O of steps of the top
layer's qcow2 driver: data write, L2 table allocation, L1 update, refcount block allocation,
L2 and refcount block write-back, COW read and write (out of clusters an internal snapshot
shares), the header (a grow), and flush; and the file's own fdatasync failing. (Refcount table
growth needs a far bigger file here; the unit fault matrix covers it.) Each case:
  - the injected errno reaches the FUSE client from write() (or fsync() for flush);
  - once: the retry succeeds and every byte is as the model says (earlier data intact);
  - always: the failed ranges are unknown, every other byte is as the model says;
  - a failed flush puts NAME.raw in a failed state: later writes and fsyncs fail with EIO
    until remount (never a silent retry); after remount the image serves again;
  - after unmount `qemu-img check` finds no corruption (leaks are allowed: errors fail towards
    leaked clusters).
Real ENOSPC: the image directory on a small tmpfs, NAME.raw filled through the mount until
ENOSPC; the daemon stays up, freeing space makes writes work again, everything fsynced reads
back and `qemu-img check` is clean.
Bad rule files fail the mount with a message naming the line.

At the end one line is printed: `faults: N checks, F failures`.
"""

import errno
import json
import os
import tempfile
import time

import harness
from harness import run, qemu_img, qemu_io, check, convert_raw

KiB = 1 << 10
MiB = 1 << 20
CHUNK = 64 * KiB
SIZE = 64 * MiB
PREFILL = 1 * MiB  # 0x11 at [0, 1M), written by qemu-io before mounting

# Where each step is reached (guest ranges written in CHUNK pieces), with 4 KiB clusters and
# 64-bit refcounts: an L2 table maps 2 MiB of guest space and a refcount block covers 2 MiB of
# the image file, so a fresh 2 MiB guest range needs a new L2 table and, once the file has grown
# past 2 MiB, a new refcount block.
STEPS = {
    # step name: (rule, guest range to write)
    "data-write": ("writes event=data-write", (512 * KiB, 256 * KiB)),
    "l2-alloc": ("writes event=l2-alloc", (40 * MiB, 256 * KiB)),
    "l1": ("writes event=l1", (44 * MiB, 256 * KiB)),  # the L1 entry of a new L2 table
    "refblock-alloc": ("writes event=refblock-alloc", (8 * MiB, 3 * MiB)),
}


def pattern(offset, n, salt):
    """Bytes that differ per chunk, so a misplaced chunk is seen."""
    head = f"{salt}:{offset}:".encode()
    return (head * (n // len(head) + 1))[:n]


class FaultTest(harness.ImageDirTest):
    def make_image(self, name="vm.qcow2"):
        path = self.img(name)
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,refcount_bits=64", path,
                 str(SIZE))
        qemu_io(path, f"write -P 0x11 0 {PREFILL}")
        model = bytearray(SIZE)
        model[:PREFILL] = b"\x11" * PREFILL
        return path, model

    def rules(self, text):
        f = tempfile.NamedTemporaryFile("w", suffix=".faults", delete=False)
        f.write(text + "\n")
        f.close()
        self.addCleanup(os.unlink, f.name)
        return f.name

    def assert_clean(self, path, allow_leaks=True):
        r = check(path)
        self.assertEqual(r["corruptions"], 0, r["text"])
        self.assertEqual(r["check-errors"], 0, r["text"])
        if not allow_leaks:
            self.assertEqual(r["leaks"], 0, r["text"])

    def assert_model(self, data, model, unknown=()):
        """`data` equals `model` outside the `unknown` (offset, length) ranges."""
        self.assertEqual(len(data), len(model))
        data = bytearray(data)
        for off, n in unknown:
            data[off:off + n] = model[off:off + n]
        if data != model:
            first = next(i for i in range(len(model)) if data[i] != model[i])
            self.fail(f"byte {first} differs: {data[first]:#x}, model {model[first]:#x}")

    def write_range(self, fd, model, start, length, salt, errnum, once):
        """Writes [start, start+length) in CHUNK pieces. Returns (first error, unknown ranges)."""
        first_error = None
        unknown = []
        for off in range(start, start + length, CHUNK):
            data = pattern(off, CHUNK, salt)
            try:
                self.assertEqual(os.pwrite(fd, data, off), CHUNK)
            except OSError as e:
                if first_error is None:
                    first_error = e.errno
                    self.assertEqual(e.errno, errnum, f"write at {off}: {e}")
                if not once:
                    unknown.append((off, CHUNK))
                    continue
                # once: the retry succeeds
                self.assertEqual(os.pwrite(fd, data, off), CHUNK, "the retry")
            model[off:off + CHUNK] = data
        return first_error, unknown

    def run_write_step(self, step, errnum, once):
        rule, (start, length) = STEPS[step]
        path, model = self.make_image()
        rule += f" errno={errno.errorcode[errnum]} {'once' if once else 'always'}"
        m = self.mount(f"faults={self.rules(rule)}")
        fd = os.open(m.path("vm.raw"), os.O_RDWR)
        try:
            if step != "data-write":
                # Earlier data acknowledged through the mount (the prefill is the earlier data
                # for data-write, which fails every write).
                os.pwrite(fd, b"\x22" * 4096, 64 * KiB)
                model[64 * KiB:68 * KiB] = b"\x22" * 4096
                os.fsync(fd)
            first_error, unknown = self.write_range(fd, model, start, length, step, errnum, once)
            self.assertEqual(first_error, errnum, f"no write failed at step {step}")
            os.fsync(fd)  # the step's faults are on writes: the flush works
            data = os.pread(fd, SIZE, 0)
        finally:
            os.close(fd)
        self.assert_model(data, model, unknown)
        self.assertIn("injected error", m.read_log())
        m.stop()
        self.assert_clean(path)
        self.assert_model(convert_raw(path), model, unknown)
        if once:
            self.assertEqual(unknown, [])

    def run_writeback_step(self, step, errnum, once):
        """Metadata written back at flush time (cached L2 tables, refcount blocks): the error
        reaches write() or fsync(); with once the retry succeeds and all data is there."""
        path, model = self.make_image()
        rule = f"writes event={step} errno={errno.errorcode[errnum]} {'once' if once else 'always'}"
        m = self.mount(f"faults={self.rules(rule)}")
        fd = os.open(m.path("vm.raw"), os.O_RDWR)
        start, length = PREFILL, 256 * KiB  # new clusters under the existing L2 table
        errors = []
        try:
            for off in range(start, start + length, CHUNK):
                data = pattern(off, CHUNK, step)
                try:
                    os.pwrite(fd, data, off)
                except OSError as e:
                    errors.append(e.errno)
                    if once:
                        os.pwrite(fd, data, off)
                model[off:off + CHUNK] = data
            try:
                os.fsync(fd)
            except OSError as e:
                errors.append(e.errno)
                if once:
                    os.fsync(fd)
            self.assertTrue(errors, f"no request failed at step {step}")
            self.assertEqual(errors[0], errnum)
            self.assertEqual(os.pread(fd, SIZE, 0), bytes(model))
        finally:
            try:
                os.close(fd)
            except OSError as e:
                self.assertFalse(once, e)
        self.stop_after_failure(m, clean=once)
        self.assert_clean(path)
        unknown = [] if once else [(start, length)]
        self.assert_model(convert_raw(path), model, unknown)
        self.assert_remount_serves(path, model, unknown)

    def run_flush_step(self, errnum, once):
        """A flush request failed by the filter above the file (not the file's fdatasync): the
        error reaches fsync(); with once the retry flushes everything (fdatasync really ran)."""
        path, model = self.make_image()
        rule = f"flush errno={errno.errorcode[errnum]} {'once' if once else 'always'}"
        m = self.mount(f"faults={self.rules(rule)}")
        fd = os.open(m.path("vm.raw"), os.O_RDWR)
        unknown = []
        try:
            # Into allocated clusters: no allocation, so no flush before the fsync.
            os.pwrite(fd, b"\x33" * CHUNK, 256 * KiB)
            model[256 * KiB:256 * KiB + CHUNK] = b"\x33" * CHUNK
            with self.assertRaises(OSError) as cm:
                os.fsync(fd)
            self.assertEqual(cm.exception.errno, errnum)
            if once:
                os.fsync(fd)
            else:
                with self.assertRaises(OSError) as cm:
                    os.fsync(fd)
                self.assertEqual(cm.exception.errno, errnum)
                unknown = [(256 * KiB, CHUNK)]  # never acknowledged
            self.assertEqual(os.pread(fd, MiB, 0), bytes(model[:MiB]))
        finally:
            try:
                os.close(fd)  # FUSE_FLUSH on close fails too with `always`
            except OSError as e:
                self.assertFalse(once, e)
        self.stop_after_failure(m, clean=once)
        self.assert_clean(path)
        self.assert_model(convert_raw(path), model, unknown)
        self.assert_remount_serves(path, model, unknown)

    def run_cow_step(self, step, errnum, once):
        """Copy-on-write out of clusters an internal snapshot shares (refcount 2): a 512-byte
        write into such a cluster reads the rest of it (cow-read) and writes the whole cluster
        elsewhere (cow-write). The errno reaches write(); the snapshot keeps its content."""
        path, model = self.make_image()
        qemu_img("snapshot", "-c", "s1", path)
        ops = "read" if step == "cow-read" else "writes"
        rule = f"{ops} event={step} errno={errno.errorcode[errnum]} {'once' if once else 'always'}"
        m = self.mount(f"faults={self.rules(rule)}")
        fd = os.open(m.path("vm.raw"), os.O_RDWR)
        first_error = None
        unknown = []
        try:
            for off in range(100, 256 * KiB, 4096):  # one partial write per 4 KiB cluster
                data = pattern(off, 512, step)
                try:
                    self.assertEqual(os.pwrite(fd, data, off), 512)
                except OSError as e:
                    if first_error is None:
                        first_error = e.errno
                    if not once:
                        unknown.append((off - 100, 4096))
                        continue
                    self.assertEqual(os.pwrite(fd, data, off), 512, "the retry")
                model[off:off + 512] = data
            self.assertEqual(first_error, errnum, f"no write failed with {errnum} at {step}")
            os.fsync(fd)
            self.assert_model(os.pread(fd, SIZE, 0), model, unknown)
        finally:
            os.close(fd)
        m.stop()
        self.assert_clean(path)
        self.assert_model(convert_raw(path), model, unknown)
        snap = convert_raw(path, ("-l", "snapshot.name=s1"))
        self.assertEqual(snap[:PREFILL], b"\x11" * PREFILL, "the snapshot changed")

    def run_header_step(self, errnum, once):
        """Growing NAME.raw rewrites the header (virtual size): the errno reaches ftruncate();
        with once the retry grows it; with always the size stays, and nothing is corrupt."""
        path, model = self.make_image()
        rule = f"writes event=header errno={errno.errorcode[errnum]} {'once' if once else 'always'}"
        m = self.mount(f"faults={self.rules(rule)}")
        raw = m.path("vm.raw")
        with self.assertRaises(OSError) as cm:
            os.truncate(raw, SIZE + 16 * MiB)
        self.assertEqual(cm.exception.errno, errnum)
        if once:
            os.truncate(raw, SIZE + 16 * MiB)
            self.assertEqual(os.stat(raw).st_size, SIZE + 16 * MiB)
        else:
            with self.assertRaises(OSError):
                os.truncate(raw, SIZE + 16 * MiB)
        fd = os.open(raw, os.O_RDWR)
        try:
            self.assert_model(os.pread(fd, SIZE, 0), model)
        finally:
            os.close(fd)
        self.stop_after_failure(m, clean=once)
        self.assert_clean(path)
        size = json.loads(run(["qemu-img", "info", "-U", "--output=json", path]).stdout)
        self.assertIn(size["virtual-size"], (SIZE, SIZE + 16 * MiB))
        if once:
            self.assertEqual(size["virtual-size"], SIZE + 16 * MiB)
        self.assert_model(convert_raw(path)[:SIZE], model)

    def run_fdatasync_step(self, errnum, nth):
        """The file driver's fdatasync fails (as the kernel reports it): NAME.raw is in a failed
        state, later writes and fsyncs fail with EIO until remount, never a silent retry."""
        path, model = self.make_image()
        rule = f"fdatasync errno={errno.errorcode[errnum]} nth={nth}"
        m = self.mount(f"faults={self.rules(rule)}")
        fd = os.open(m.path("vm.raw"), os.O_RDWR)
        try:
            for i in range(nth - 1):
                # Acknowledged by fsync before the failure: must survive.
                os.pwrite(fd, b"\x22" * CHUNK, 128 * KiB + i * CHUNK)
                model[128 * KiB + i * CHUNK:128 * KiB + (i + 1) * CHUNK] = b"\x22" * CHUNK
                os.fsync(fd)
            os.pwrite(fd, b"\x33" * CHUNK, 512 * KiB)
            with self.assertRaises(OSError) as cm:
                os.fsync(fd)
            self.assertEqual(cm.exception.errno, errnum)
            for attempt in range(3):
                with self.assertRaises(OSError) as cm:
                    os.fsync(fd)
                self.assertEqual(cm.exception.errno, errno.EIO, "fsync after a failed fsync")
                for off in (768 * KiB, 40 * MiB):  # allocated, and needing allocation
                    with self.assertRaises(OSError) as cm:
                        os.pwrite(fd, b"\x44" * 4096, off + attempt * 4096)
                    self.assertEqual(cm.exception.errno, errno.EIO, "write after failed fsync")
            # Reads still work.
            self.assertEqual(os.pread(fd, 128 * KiB, 0), bytes(model[:128 * KiB]))
        finally:
            try:
                os.close(fd)
            except OSError as e:
                self.assertEqual(e.errno, errno.EIO)
        fd = os.open(m.path("vm.raw"), os.O_RDWR)  # a new open does not clear it either
        try:
            with self.assertRaises(OSError) as cm:
                os.pwrite(fd, b"\x44" * 4096, 0)
            self.assertEqual(cm.exception.errno, errno.EIO)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
        self.assertIn("fdatasync failed", m.read_log())
        # Said where the operator looks, with the way out.
        self.assertIn("fdatasync", m.info("vm")["writes_refused"] or "")
        status = run([harness.IMGFS, "status", m.mountpoint]).stdout
        self.assertIn("WRITES REFUSED", status)
        self.assertIn("close vm.raw and rescan", status)
        # Closed, a rescan opens the image afresh, and writes work again. (The rule fails the
        # new file's fdatasyncs as it did the old one's, so the close may still fail.)
        deadline = time.time() + 10
        while m.info("vm")["writes_refused"] is not None and time.time() < deadline:
            with open(m.path(".control", "rescan"), "w") as c:
                c.write("\n")
            time.sleep(0.1)
        self.assertIsNone(m.info("vm")["writes_refused"])
        fd = os.open(m.path("vm.raw"), os.O_RDWR)
        try:
            os.pwrite(fd, b"\x66" * 4096, 512 * KiB)  # within the range left unknown below
        finally:
            try:
                os.close(fd)
            except OSError as e:
                self.assertEqual(e.errno, errnum if nth == 1 else errno.EIO)
        self.stop_after_failure(m, clean=False)
        self.assert_clean(path)
        unknown = [(512 * KiB, CHUNK)]  # written, never acknowledged
        self.assert_model(convert_raw(path), model, unknown)
        self.assert_remount_serves(path, model, unknown)

    def assert_remount_serves(self, path, model, unknown):
        m = self.mount()
        fd = os.open(m.path("vm.raw"), os.O_RDWR)
        try:
            os.pwrite(fd, b"\x55" * CHUNK, 6 * MiB)
            os.fsync(fd)
            model[6 * MiB:6 * MiB + CHUNK] = b"\x55" * CHUNK
            self.assert_model(os.pread(fd, SIZE, 0), model, unknown)
        finally:
            os.close(fd)
        m.stop()
        self.assert_clean(path)

    def stop_after_failure(self, m, clean):
        """Unmounts. An image whose flushes fail cannot be flushed at close either: then the
        daemon must still exit (non-zero, saying why in its log), not hang."""
        if clean:
            m.stop()
            return
        try:
            m.stop()
        except AssertionError as e:
            # Exit status 1 with the reason; a crash (a signal, or the sanitizers' abort) is not
            # an orderly refusal.
            self.assertIn("exited with 1", str(e))
            self.assertIn("did not flush or close cleanly", m.read_log())


def _add_matrix():
    for errnum in (errno.EIO, errno.ENOSPC):
        for nth in (1, 3):
            def t(self, errnum=errnum, nth=nth):
                self.run_fdatasync_step(errnum, nth)
            setattr(FaultTest, f"test_fdatasync_{errno.errorcode[errnum].lower()}_nth{nth}", t)
    for step in ("l2-write", "refblock-write"):
        for errnum in (errno.EIO, errno.ENOSPC):
            for once in (True, False):
                name = (f"test_{step.replace('-', '_')}_{errno.errorcode[errnum].lower()}_"
                        f"{'once' if once else 'always'}")

                def t(self, step=step, errnum=errnum, once=once):
                    self.run_writeback_step(step, errnum, once)
                setattr(FaultTest, name, t)
    for step in ("cow-read", "cow-write", "header"):
        for errnum in (errno.EIO, errno.ENOSPC):
            for once in (True, False):
                name = (f"test_{step.replace('-', '_')}_{errno.errorcode[errnum].lower()}_"
                        f"{'once' if once else 'always'}")
                if step == "header":
                    def t(self, errnum=errnum, once=once):
                        self.run_header_step(errnum, once)
                else:
                    def t(self, step=step, errnum=errnum, once=once):
                        self.run_cow_step(step, errnum, once)
                setattr(FaultTest, name, t)
    for step in list(STEPS) + ["flush"]:
        for errnum in (errno.EIO, errno.ENOSPC):
            for once in (True, False):
                name = (f"test_{step.replace('-', '_')}_{errno.errorcode[errnum].lower()}_"
                        f"{'once' if once else 'always'}")
                if step == "flush":
                    def t(self, errnum=errnum, once=once):
                        self.run_flush_step(errnum, once)
                else:
                    def t(self, step=step, errnum=errnum, once=once):
                        self.run_write_step(step, errnum, once)
                setattr(FaultTest, name, t)


_add_matrix()


class RuleFile(harness.ImageDirTest):
    def test_bad_rule_files_fail_the_mount(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "1M")
        cases = {
            "frobnicate errno=EIO\n": "line 1: unknown operation 'frobnicate'",
            "# comment\n\nwrite errno=EWHAT\n": "line 3: unknown errno 'EWHAT'",
            "write event=nope\n": "unknown event 'nope'",
            "write nth=x\n": "line 1",
            "write sometimes\n": "unknown word 'sometimes'",
            "write layers=middle\n": "bad 'layers=middle'",
            "# only a comment\n": "no rules",
        }
        for text, expect in cases.items():
            with self.subTest(text=text):
                f = tempfile.NamedTemporaryFile("w", delete=False)
                f.write(text)
                f.close()
                self.addCleanup(os.unlink, f.name)
                mnt = tempfile.mkdtemp(prefix="imgfs-mnt-")
                self.addCleanup(os.rmdir, mnt)
                p = run([harness.IMGFS, "mount", "-f", "-o", f"faults={f.name}", self.dir, mnt],
                        check=False, timeout=30)
                self.assertNotEqual(p.returncode, 0)
                self.assertIn(expect, p.stderr)
                self.assertIn(f.name, p.stderr)
                self.assertEqual(p.stderr.count("\n"), 1, p.stderr)  # one line
                self.assertFalse(harness.is_mounted(mnt))
        p = run([harness.IMGFS, "mount", "-f", "-o", "faults=/nonexistent/rules", self.dir,
                 "/tmp"], check=False, timeout=30)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("cannot read the rule file", p.stderr)

    def test_rules_on_every_layer_and_by_file(self):
        # A read fault on the base only (layers=all, file=...): reads of the overlay's own
        # data work, reads reaching the base fail with the injected errno.
        qemu_img("create", "-q", "-f", "qcow2", self.img("base.qcow2"), "4M")
        qemu_io(self.img("base.qcow2"), "write -P 0x61 0 4M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                 self.img("vm.qcow2"), "4M")
        qemu_io(self.img("vm.qcow2"), "write -P 0x62 0 64k")
        f = tempfile.NamedTemporaryFile("w", delete=False)
        f.write("read event=data-read errno=ENODATA layers=all file=base.qcow2  # base only\n")
        f.close()
        self.addCleanup(os.unlink, f.name)
        m = self.mount(f"faults={f.name}")
        fd = os.open(m.path("vm.raw"), os.O_RDONLY)
        try:
            self.assertEqual(os.pread(fd, 65536, 0), b"\x62" * 65536)
            with self.assertRaises(OSError) as cm:
                os.pread(fd, 65536, 1 * MiB)
            self.assertEqual(cm.exception.errno, errno.ENODATA)
        finally:
            os.close(fd)
        m.stop()


class JobFaults(harness.ImageDirTest):
    """Faults under a running job: the job fails with the error, the daemon stays up, the
    chain and NAME.raw are as before, and after a remount the job works."""

    def build(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("base.qcow2"), "16M")
        qemu_io(self.img("base.qcow2"), "write -P 0x11 0 4M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                 self.img("vm@s1.qcow2"), "16M")
        qemu_io(self.img("vm@s1.qcow2"), "write -P 0x22 0 2M", "write -z 3M 1M")
        return convert_raw(self.img("vm@s1.qcow2"))

    def wait_job(self, m):
        for _ in range(600):
            with open(m.path(".control", "vm", "job")) as f:
                text = f.read().strip()
            job = json.loads(text) if text else {}
            if job.get("state") == "concluded":
                return job
            time.sleep(0.05)
        self.fail(f"the job did not conclude: {job}")

    def commit_under(self, rule):
        """Mounts with the fault `rule` and commits vm; the mount, and the concluded job."""
        f = tempfile.NamedTemporaryFile("w", suffix=".faults", delete=False)
        f.write(rule + "\n")
        f.close()
        self.addCleanup(os.unlink, f.name)
        m = self.mount(f"faults={f.name}")
        with open(m.path(".control", "vm", "commit"), "w") as c:
            c.write("\n")
        return m, self.wait_job(m)

    def run_job_fault(self, job, rule, close_fails=False):
        expected = self.build()
        f = tempfile.NamedTemporaryFile("w", suffix=".faults", delete=False)
        f.write(rule + "\n")
        f.close()
        self.addCleanup(os.unlink, f.name)
        m = self.mount(f"faults={f.name}")
        with open(m.path(".control", "vm", job), "w") as c:
            c.write("\n")
        result = self.wait_job(m)
        self.assertIn("injected error", result["error"])
        self.assertIsNone(m.proc.poll(), "the daemon died")
        self.assertIn(job, m.info("vm")["last_error"])
        self.assertEqual([l["file"] for l in m.info("vm")["layers"]],
                         ["vm@s1.qcow2", "base.qcow2"])
        if close_fails:
            # The layer's cached metadata cannot be written at close either: the daemon still
            # exits, and its status says so.
            with self.assertRaisesRegex(AssertionError, "exited with 1"):
                m.stop()
            self.assertIn("1 layer did not flush or close cleanly", m.read_log())
            self.assertIn("its daemon did not end well: 1 layer", m.unmount_stderr)
        else:
            m.stop()
        for name in ("vm@s1.qcow2", "base.qcow2"):
            r = check(self.img(name))
            self.assertEqual((r["corruptions"], r["check-errors"]), (0, 0), r["text"])
        self.assertEqual(convert_raw(self.img("vm@s1.qcow2")), expected)
        # Without the fault the same job completes.
        m = self.mount()
        with open(m.path(".control", "vm", job), "w") as c:
            c.write("\n")
        self.assertFalse(self.wait_job(m)["error"])
        with open(m.path("vm.raw"), "rb") as raw:
            self.assertEqual(raw.read(), expected)
        m.stop()
        return expected

    def test_commit_with_failing_base_writes(self):
        expected = self.run_job_fault("commit", "writes errno=EIO layers=all file=base.qcow2 nth=2",
                                      close_fails=True)
        self.assertEqual(convert_raw(self.img("base.qcow2")), expected)

    def test_a_base_that_failed_a_flush_is_shown_refusing_writes(self):
        # A commit whose base fails an fdatasync fails, and the base refuses writes until it is
        # opened afresh: the guest sees nothing (its writes go to the top), so only status can
        # tell the operator why the next commit fails, and how to clear it.
        expected = self.build()
        m, result = self.commit_under("fdatasync errno=EIO layers=all file=base.qcow2")
        self.assertIn("fdatasync", result["error"] or "")
        base = [l for l in m.info("vm")["layers"] if l["file"] == "base.qcow2"]
        self.assertIn("fdatasync", base[0].get("writes_refused") or "", base)
        status = run([harness.IMGFS, "status", m.mountpoint]).stdout
        self.assertIn("backing layer base.qcow2 refuses writes", status)
        self.assertIn("close vm.raw and rescan", status)
        self.assertNotIn("WRITES REFUSED", status)  # the guest's writes go on
        with open(m.path("vm.raw"), "r+b") as raw:
            raw.write(b"\x77" * 4096)
            os.fsync(raw.fileno())
        expected = b"\x77" * 4096 + expected[4096:]
        with self.assertRaisesRegex(AssertionError, "exited with 1"):
            m.stop()  # the base's cached metadata cannot be flushed either
        for name in ("vm@s1.qcow2", "base.qcow2"):
            r = check(self.img(name))
            self.assertEqual((r["corruptions"], r["check-errors"]), (0, 0), r["text"])
        m = self.mount()
        with open(m.path("vm.raw"), "rb") as raw:
            self.assertEqual(raw.read(), expected)
        m.stop()

    def test_a_commit_that_cannot_grow_its_base_leaves_it_to_qemu(self):
        # The image is larger than its base, so a commit grows the base first, writable. When
        # that fails (here every write to the base), the base goes back to read-only, and its
        # file must give up QEMU's write lock with it: a backup of the frozen layer by QEMU
        # (qemu-img without -U) was refused until the next change to the chains.
        self.build()
        qemu_img("resize", "-q", self.img("vm@s1.qcow2"), "32M")
        m, result = self.commit_under("writes errno=ENOSPC layers=all file=base.qcow2")
        self.assertIn("growing base.qcow2", result["error"] or "")
        info = run(["qemu-img", "info", self.img("base.qcow2")], check=False)
        self.assertEqual(info.returncode, 0, info.stderr)
        m.stop()

    def test_stream_with_failing_backing_reads(self):
        expected = self.run_job_fault(
            "stream", "read event=data-read errno=EIO layers=all file=base.qcow2")
        self.assertEqual(convert_raw(self.img("vm@s1.qcow2")), expected)


class RealEnospc(harness.ImageDirTest):
    tmpfs = None

    def tearDown(self):
        for m in self.mounts:
            m.cleanup()
        if self.tmpfs:
            run(["umount", self.tmpfs], check=False)
        super().tearDown()

    def test_fill_a_small_tmpfs_through_the_mount(self):
        tmpfs = self.dir
        run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", tmpfs])
        self.tmpfs = tmpfs
        path = self.img("vm.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", path, "64M")
        # Ballast that is freed later, so that writes can go on after ENOSPC.
        with open(os.path.join(tmpfs, "ballast"), "wb") as f:
            f.write(b"\xba" * (4 * MiB))
        m = self.mount()
        model = bytearray(64 * MiB)
        durable = 0  # everything below was acknowledged by fsync
        fd = os.open(m.path("vm.raw"), os.O_RDWR)
        got = None
        try:
            off = 0
            while off < 64 * MiB:
                data = pattern(off, MiB, "fill")
                try:
                    n = os.pwrite(fd, data, off)
                except OSError as e:
                    got = e.errno
                    break
                model[off:off + n] = data[:n]
                off += n
                if off % (4 * MiB) == 0:
                    os.fsync(fd)
                    durable = off
            self.assertEqual(got, errno.ENOSPC, "filling the tmpfs through vm.raw")
            self.assertGreater(durable, 8 * MiB)
            stopped_at = off
            # The daemon is up and serves the acknowledged data.
            self.assertEqual(os.pread(fd, durable, 0), bytes(model[:durable]))
            self.assertIsNone(m.proc.poll())
            # Free space: writing goes on from where it stopped (ENOSPC is no failed state).
            os.unlink(os.path.join(tmpfs, "ballast"))
            data = pattern(stopped_at, MiB, "again")
            self.assertEqual(os.pwrite(fd, data, stopped_at), MiB)
            model[stopped_at:stopped_at + MiB] = data
            os.fsync(fd)
            self.assertEqual(os.pread(fd, stopped_at + MiB, 0), bytes(model[:stopped_at + MiB]))
        finally:
            os.close(fd)
        m.stop()
        self.assert_clean_image(path)
        self.assertEqual(convert_raw(path)[:stopped_at + MiB], bytes(model[:stopped_at + MiB]))

    def assert_clean_image(self, path):
        r = check(path)
        self.assertEqual((r["corruptions"], r["check-errors"]), (0, 0), r["text"])


if __name__ == "__main__":
    harness.main_with_summary("faults")
