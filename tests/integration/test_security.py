#!/usr/bin/env python3
"""Security (issue 6, item 5).

- Backing files are confined: while serving a directory whose images name hostile backing
  files (absolute paths outside, `..`, a symlink out, a symlinked folder, `json:` and protocol
  names, an image file that is itself a symlink out), the daemon, watched by strace, never
  opens (or tries to open) a file outside IMAGE_DIR, and none of its descriptors points there.
- Hostile control input (huge writes, binary, NUL bytes, long lines, many lines, unknown
  commands, path-like names) gets EINVAL with a reason in info; nothing in IMAGE_DIR changes;
  the daemon stays up and still takes a valid command.
- The mount carries nosuid, nodev and default_permissions; another user (uid 65534) is denied
  NAME.raw and .control without allow_other.
- Image locking is QEMU's: qemu-io cannot write an exported image, and an image that a running
  qemu-io holds for writing is not served writable (refused, with a message).
- Requests whose offset plus size overflows (pread/pwrite at 2**63-1, huge fallocate and
  truncate sizes) fail with EINVAL/EFBIG or read short; the daemon never crashes.

At the end one line is printed: `security: N checks, F failures`.
"""

import errno
import json
import os
import random
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time

import harness
from harness import convert_raw, run, qemu_img, qemu_io

KiB = 1 << 10
MiB = 1 << 20
NOBODY = 65534

# The system calls that open (or create, or resolve to open) a path.
OPEN_CALLS = ("open", "openat", "openat2", "creat", "open_tree", "name_to_handle_at",
              "execve", "truncate", "mknod", "mknodat", "link", "linkat", "symlink",
              "symlinkat", "rename", "renameat", "renameat2")


class Confinement(harness.ImageDirTest):
    def build(self):
        outside = tempfile.mkdtemp(prefix="imgfs-outside-")
        self.addCleanup(shutil.rmtree, outside, True)
        secret_raw = os.path.join(outside, "secret.img")
        secret_q = os.path.join(outside, "secret.qcow2")
        qemu_img("create", "-q", "-f", "raw", secret_raw, "1M")
        qemu_img("create", "-q", "-f", "qcow2", secret_q, "1M")
        rel_out = os.path.relpath(outside, self.dir)  # ../imgfs-outside-XXX
        hostile = {
            "abs": (secret_raw, "raw"),
            "absq": (secret_q, "qcow2"),
            "dotdot": (f"{rel_out}/secret.img", "raw"),
            "deepdotdot": (f"sub/../../{os.path.basename(outside)}/secret.img", "raw"),
            "dotdotinside": (f"../{os.path.basename(self.dir)}/../{rel_out}/secret.img", "raw"),
            "link": ("escape.lnk", "raw"),
            "linkdir": ("outdir/secret.img", "raw"),
            "json": ('json:{"driver":"raw","file":{"driver":"file","filename":"'
                     + secret_raw + '"}}', "raw"),
            "file": (f"file:{secret_raw}", "raw"),
            "nbd": ("nbd+unix:///x?socket=/tmp/imgfs-nbd.sock", "raw"),
            "https": ("https://127.0.0.1:1/secret.img", "raw"),
        }
        for name, (backing, fmt) in hostile.items():
            qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt,
                     self.img(f"{name}.qcow2"), "1M")
        os.symlink(secret_raw, self.img("escape.lnk"))
        os.symlink(outside, self.img("outdir"))
        os.symlink(secret_q, self.img("lnkimg.qcow2"))  # the image itself points out
        qemu_img("create", "-q", "-f", "qcow2", self.img("good.qcow2"), "1M")
        qemu_io(self.img("good.qcow2"), "write -P 0x5a 0 64k")
        return outside, list(hostile) + ["lnkimg"]

    def test_no_open_outside_the_image_directory(self):
        harness.require_tools("strace")
        outside, hostile = self.build()
        trace = os.path.join(self.dir + ".strace")
        self.addCleanup(lambda: os.path.exists(trace) and os.unlink(trace))
        # The daemon runs under strace from its first instruction, so startup (the scan and
        # the chain opens) is watched too.
        m = self.mount(wrapper=["strace", "-f", "-qq", "-s", "4096", "-e",
                                "trace=%file,openat2", "-o", trace])
        self.assertEqual(m.exports(), ["good"])
        log = m.read_log()
        for needle in ("outside the image directory", "escapes the image directory",
                       "json: backing file names are refused",
                       "protocol backing file names", "resolves outside the image directory"):
            self.assertIn(needle, log)
        with open(m.path("good.raw"), "rb") as f:
            self.assertEqual(f.read(64 * KiB), b"\x5a" * 64 * KiB)
        # A rescan and reading every control file make the daemon look at everything again.
        with open(m.path(".control", "rescan"), "w") as f:
            f.write("\n")
        for root, _, files in os.walk(m.path(".control")):
            for fn in files:
                with open(os.path.join(root, fn)) as f:
                    f.read()
        self.assert_descriptors_inside(m, outside)
        m.stop()
        self.assert_trace_inside(trace, outside)
        for name in hostile:
            self.assertIn(f"{name}.qcow2", log)  # each one is reported

    def daemon_pid(self, m):
        """The imgfs process (the child of strace)."""
        for _ in range(50):
            p = run(["pgrep", "-P", str(m.proc.pid)], check=False)
            if p.stdout.strip():
                return int(p.stdout.split()[0])
            time.sleep(0.1)
        self.fail("no daemon under strace")

    def assert_descriptors_inside(self, m, outside):
        pid = self.daemon_pid(m)
        fd_dir = f"/proc/{pid}/fd"
        targets = []
        for fd in os.listdir(fd_dir):
            try:
                targets.append(os.readlink(os.path.join(fd_dir, fd)))
            except OSError:
                continue
        self.assertTrue(any(t.startswith(os.path.realpath(self.dir) + "/") for t in targets),
                        targets)
        for t in targets:
            self.assertFalse(t.startswith(outside), f"the daemon holds {t}")
            self.assertNotIn("secret", t)

    def assert_trace_inside(self, trace, outside):
        with open(trace) as f:
            lines = f.read().splitlines()
        self.assertTrue(any("openat2(" in l and "good.qcow2" in l for l in lines),
                        "strace saw no image open: is the trace working?")
        bad = []
        refused = []
        for line in lines:
            m = re.match(r"^\d+\s+(\w+)\((.*)", line)
            if not m or m.group(1) not in OPEN_CALLS:
                continue
            for p in re.findall(r'"((?:[^"\\]|\\.)*)"', m.group(2)):
                if not (p.startswith(outside) or "secret" in p or os.path.basename(outside) in p
                        or p.startswith("..") or "/../" in p or re.match(r"^[a-z+]+:", p)):
                    continue
                # A path inside IMAGE_DIR that leads out through a symlink, opened with
                # RESOLVE_BENEATH: the kernel refuses to leave the directory. That is the
                # confinement at work, not an open outside.
                if (m.group(1) == "openat2" and "RESOLVE_BENEATH" in line
                        and re.search(r"= -1 (EXDEV|ELOOP)", line)):
                    refused.append(line)
                else:
                    bad.append(line)
        self.assertEqual(bad, [], "opens outside IMAGE_DIR:\n" + "\n".join(bad[:20]))
        # The symlinks out (escape.lnk, outdir/, lnkimg.qcow2) were stopped by the kernel.
        self.assertTrue(any("outdir/secret.img" in l for l in refused), refused)


def control_write(path, data):
    """One write() of `data` to a control file: 0 or the errno."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as e:
        return e.errno
    try:
        os.write(fd, data)
        return 0
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)


class ControlInput(harness.ImageDirTest):
    def hostile_inputs(self):
        rng = random.Random(6)
        binary = bytes(rng.randrange(256) for _ in range(4096))
        return {
            "huge": b"a" * MiB,
            "huge-lines": b"s\n" * (MiB // 2),
            "binary": binary,
            "nul": b"s1\x00evil",
            "nul-only": b"\x00",
            "long-line": b"x" * 5000,
            "many-lines": b"a b\n" * 5000,
            "two-commands": b"s1\ns2\n",
            "unknown": b"frobnicate",
            "dotdot": b"../escape",
            "absolute": b"/etc/passwd",
            "slash": b"a/b",
            "dot": b".",
            "dotfile": b".hidden",
            "dash": b"-rf",
            "long-name": b"A" * 65,
            "spaces": b"a b c",
            "utf8": "snäp".encode(),
            "cr": b"s1\r",
            "tab": b"s1\tx",
            "base-escape": b"base=../../etc/passwd",
            "base-abs": b"base=/etc/passwd",
            "speed-negative": b"speed -1",
            "speed-overflow": b"speed 999999999999999999999999",
            "group-unknown": b"nosuchimage s1",
            "group-path": b"../good s1",
        }

    def test_hostile_control_input(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("good.qcow2"), "4M")
        qemu_io(self.img("good.qcow2"), "write -P 0x5a 0 64k")
        m = self.mount()
        # A finished job, so that job commands get as far as parsing their arguments.
        self.assertEqual(control_write(m.path(".control", "good", "snapshot"), b"ok1\n"), 0)
        before = sorted(os.listdir(self.dir))
        files = [("good", f) for f in ("snapshot", "commit", "revert", "stream", "job", "info")]
        files += [(None, f) for f in ("snapshot", "rescan", "jobs")]
        for name, file in files:
            path = m.path(".control", name, file) if name else m.path(".control", file)
            # Read-only control files refuse to be opened for writing.
            expected = errno.EACCES if file in ("info", "jobs") else errno.EINVAL
            for what, data in self.hostile_inputs().items():
                if file == "snapshot" and what == "unknown":
                    continue  # "frobnicate" is a valid snapshot name
                with self.subTest(file=f"{name}/{file}" if name else file, input=what):
                    got = control_write(path, data)
                    self.assertEqual(got, expected, f"{errno.errorcode.get(got, got)}")
                    self.assertIsNone(m.proc.poll(), "the daemon died")
                    if name and expected == errno.EINVAL:
                        self.assertNotEqual(m.info("good")["last_error"], "")  # the reason
        self.assertEqual(sorted(os.listdir(self.dir)), before, "IMAGE_DIR changed")
        self.assertEqual(m.exports(), ["good"])
        # Still serving, still taking commands.
        with open(m.path("good.raw"), "rb") as f:
            self.assertEqual(f.read(64 * KiB), b"\x5a" * 64 * KiB)
        self.assertEqual(control_write(m.path(".control", "good", "snapshot"), b"ok2\n"), 0)
        self.assertTrue(os.path.exists(self.img("good@ok2.qcow2")))
        self.assertEqual(m.info("good")["layers"][0]["file"], "good@ok2.qcow2")
        m.stop()
        r = harness.check(self.img("good@ok2.qcow2"))
        self.assertEqual((r["corruptions"], r["leaks"], r["check-errors"]), (0, 0, 0), r["text"])


def as_nobody(*cmd):
    return run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd],
               check=False)


class OtherUsers(harness.ImageDirTest):
    def setUp(self):
        super().setUp()
        harness.require_tools("setpriv")
        qemu_img("create", "-q", "-f", "qcow2", self.img("good.qcow2"), "1M")
        # The mount point must be reachable for uid 65534, or the test proves nothing.
        os.chmod(self.dir, 0o755)

    def mount_options(self, m):
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if fields[1] == os.path.realpath(m.mountpoint):
                    return set(fields[3].split(","))
        self.fail("not in /proc/mounts")

    def test_mount_flags(self):
        m = self.mount()
        opts = self.mount_options(m)
        for o in ("nosuid", "nodev", "default_permissions"):
            self.assertIn(o, opts)
        self.assertNotIn("allow_other", opts)
        self.assertEqual(stat.S_IMODE(os.stat(m.path("good.raw")).st_mode) & 0o077, 0)
        self.assertEqual(stat.S_IMODE(os.stat(m.path(".control", "good", "snapshot")).st_mode)
                         & 0o077, 0)
        m.stop()  # a clean exit, which teardown would not require

    def test_other_user_denied_without_allow_other(self):
        mnt = tempfile.mkdtemp(prefix="imgfs-mnt-")
        os.chmod(mnt, 0o755)
        m = self.mount(mountpoint=mnt)
        self.addCleanup(shutil.rmtree, mnt, True)
        for path in (m.path("good.raw"), m.path(".control", "good", "info"),
                     m.path(".control", "jobs")):
            p = as_nobody("cat", path)
            self.assertNotEqual(p.returncode, 0, path)
            self.assertIn("Permission denied", p.stderr)
        p = as_nobody("sh", "-c", f"echo s1 > {m.path('.control', 'good', 'snapshot')}")
        self.assertNotEqual(p.returncode, 0)
        p = as_nobody("ls", m.mountpoint)
        self.assertNotEqual(p.returncode, 0)
        self.assertFalse(os.path.exists(self.img("good@s1.qcow2")))
        # Root (the owner) gets in, so the denial above is about the user.
        with open(m.path("good.raw"), "rb") as f:
            self.assertEqual(len(f.read()), MiB)
        m.stop()

    def test_allow_other_lets_others_in(self):
        # The control case: with allow_other the same commands work, so the test above is not
        # failing for an unrelated reason (a path uid 65534 cannot reach).
        mnt = tempfile.mkdtemp(prefix="imgfs-mnt-")
        os.chmod(mnt, 0o755)
        self.addCleanup(shutil.rmtree, mnt, True)
        m = self.mount("allow_other", mountpoint=mnt)
        self.assertIn("allow_other", self.mount_options(m))
        p = as_nobody("cat", m.path("good.raw"))
        self.assertEqual(p.returncode, 0, p.stderr)
        m.stop()


class QemuLocking(harness.ImageDirTest):
    def test_qemu_io_cannot_write_an_exported_image(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "4M")
        qemu_img("create", "-q", "-f", "raw", self.img("disk.raw"), "4M")
        m = self.mount()
        self.assertEqual(m.exports(), ["disk", "vm"])
        for img, fmt in (("vm.qcow2", "qcow2"), ("disk.raw", "raw")):
            with self.subTest(image=img):
                p = run(["qemu-io", "-f", fmt, "-c", "write -P 0x66 0 4k", self.img(img)],
                        check=False)
                self.assertNotEqual(p.returncode, 0, p.stdout)
                self.assertIn("lock", p.stdout + p.stderr)
        with open(m.path("vm.raw"), "rb") as f:
            self.assertEqual(f.read(4096), bytes(4096))
        m.stop()
        # Unmounted: qemu-io writes again (the locks went with the daemon).
        qemu_io(self.img("vm.qcow2"), "write -P 0x66 0 4k")

    def test_a_lock_let_go_while_the_mount_scans_is_waited_for(self):
        """A daemon killed a moment ago holds its image locks until the kernel has finished its
        I/O. The scan at mount time tries a locked image again for a while, so an image whose
        holder ends meanwhile is served, writable, instead of skipped until a rescan."""
        qemu_img("create", "-q", "-f", "qcow2", self.img("held.qcow2"), "4M")
        q = subprocess.Popen(["qemu-io", "-f", "qcow2", self.img("held.qcow2")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        self.addCleanup(q.stdout.close)
        self.addCleanup(lambda: q.poll() is None and (q.kill(), q.wait()))
        q.stdin.write("write -P 0x5a 0 4k\n")
        q.stdin.flush()
        time.sleep(0.3)
        self.assertIsNone(q.poll(), "qemu-io did not stay up")
        # The holder lets go once the daemon says it waits for the lock: inside the 2 s grace
        # (a fixed delay could end it before a slow build's daemon even looked).
        first = len(self.mounts)

        def end_the_holder_once_the_daemon_waits():
            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    with open(self.mounts[first].log_path) as f:
                        if "trying again for up to" in f.read():
                            break
                except (IndexError, OSError):
                    pass
                time.sleep(0.02)
            q.stdin.close()
            q.wait(timeout=30)

        ender = threading.Thread(target=end_the_holder_once_the_daemon_waits)
        ender.start()
        start = time.monotonic()
        m = self.mount()
        ender.join()
        took = time.monotonic() - start
        self.assertEqual(m.exports(), ["held"], m.read_log())
        log = m.read_log()
        self.assertIn("trying again for up to", log)
        self.assertNotIn("in use by another process (QEMU?) that does not allow", log.split("trying again")[1])
        with open(m.path("held.raw"), "r+b") as f:
            self.assertEqual(f.read(4096), b"\x5a" * 4096)
            f.seek(0)
            f.write(b"\x33" * 4096)
        m.stop()
        self.assertLess(took, 10)
        self.assertEqual(convert_raw(self.img("held.qcow2"))[:4096], b"\x33" * 4096)

    def test_image_held_by_qemu_is_not_served_writable(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("held.qcow2"), "4M")
        qemu_img("create", "-q", "-f", "qcow2", self.img("free.qcow2"), "4M")
        # qemu-io keeps the image open read-write until its stdin closes.
        q = subprocess.Popen(["qemu-io", "-f", "qcow2", self.img("held.qcow2")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        def stop_qemu_io():
            if q.poll() is None:
                q.kill()
                q.wait()
            q.stdout.close()
        self.addCleanup(stop_qemu_io)
        q.stdin.write("write -P 0x77 0 4k\n")
        q.stdin.flush()
        time.sleep(0.5)
        self.assertIsNone(q.poll(), "qemu-io did not stay up")
        m = self.mount()
        exports = m.exports()
        self.assertIn("free", exports)
        log = m.read_log()
        if "held" in exports:
            # Served read-only: writes are refused.
            with self.assertRaises(OSError) as cm:
                with open(m.path("held.raw"), "r+b") as f:
                    f.write(b"x")
                    f.flush()
            self.assertIn(cm.exception.errno, (errno.EROFS, errno.EACCES, errno.EPERM))
        self.assertIn("held.qcow2", log)
        self.assertIn("in use by another process", log)
        q.stdin.close()
        q.wait(timeout=30)
        self.assertEqual(q.returncode, 0, q.stdout.read())
        # Once qemu-io is gone, a rescan exports it.
        with open(m.path(".control", "rescan"), "w") as f:
            f.write("\n")
        self.assertIn("held", m.exports())
        with open(m.path("held.raw"), "rb") as f:
            self.assertEqual(f.read(4096), b"\x77" * 4096)
        m.stop()


class RawHeaderGuard(harness.ImageDirTest):
    def test_a_guest_cannot_make_its_raw_base_a_qcow2_through_a_commit(self):
        # vm.img is raw, and its format is guessed while it is the image's root. Once a
        # snapshot's overlay records "raw" for it, a remount opens it as a backing layer with
        # that format. The guest writes a qcow2 header naming another VM's disk into sector 0
        # (it lands in the overlay); a commit into vm.img would put it there, and vm.img,
        # the root again, would open as a qcow2 backed by other.qcow2 on the next mount.
        qemu_img("create", "-q", "-f", "raw", self.img("vm.img"), "4M")
        qemu_io(self.img("vm.img"), "write -P 0x11 0 4M", fmt="raw")
        qemu_img("create", "-q", "-f", "qcow2", self.img("other.qcow2"), "4M")
        qemu_io(self.img("other.qcow2"), "write -P 0x5e 0 4M")
        m = self.mount()
        with open(m.path(".control/vm/snapshot"), "w") as f:
            f.write("s1\n")
        m.stop()
        m = self.mount()
        with open(m.path(".control/vm/snapshot")) as f:
            self.assertEqual(f.read().split(), ["vm@s1.qcow2", "vm.img"])
        name = b"other.qcow2"
        header = bytearray(512)
        header[0:4] = b"QFI\xfb"
        header[4:8] = (2).to_bytes(4, "big")                  # version
        header[8:16] = (512).to_bytes(8, "big")               # backing file offset
        header[16:20] = len(name).to_bytes(4, "big")
        header[20:24] = (16).to_bytes(4, "big")               # cluster bits
        header[24:32] = (4 * MiB).to_bytes(8, "big")          # size
        header[512 - len(name):] = name
        header[8:16] = (512 - len(name)).to_bytes(8, "big")
        fd = os.open(m.path("vm.raw"), os.O_WRONLY)
        os.pwrite(fd, bytes(header), 0)
        os.close(fd)
        with open(m.path(".control/vm/commit"), "w") as f:
            f.write("base=vm.img\n")
        deadline = time.time() + 60
        while True:
            with open(m.path(".control/vm/job")) as f:
                job = json.loads(f.read())
            if job["state"] == "concluded" or time.time() > deadline:
                break
            time.sleep(0.05)
        self.assertIn("refusing to write a qcow2 header", job["error"] or "", m.read_log())
        m.stop()
        with open(self.img("vm.img"), "rb") as f:
            self.assertNotEqual(f.read(4), b"QFI\xfb", "the guest's header reached vm.img")
        m = self.mount()
        with open(m.path("vm.raw"), "rb") as f:
            self.assertEqual(f.read(512), bytes(header))  # the overlay still holds it
        m.stop()


class Overflow(harness.ImageDirTest):
    def check_alive(self, m, name):
        self.assertIsNone(m.proc.poll(), "the daemon died")
        with open(m.path(f"{name}.raw"), "rb") as f:
            self.assertEqual(len(f.read(4096)), 4096)

    def expect(self, allowed, fn, *args):
        """Calls fn; returns its result, or the errno (which must be in `allowed`)."""
        try:
            return fn(*args)
        except OSError as e:
            self.assertIn(e.errno, allowed, f"{fn.__name__}{args[1:]}: {e}")
            return e.errno

    def test_offset_plus_size_overflow(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "4M")
        qemu_img("create", "-q", "-f", "raw", self.img("disk.raw"), "4M")
        m = self.mount()
        big = (1 << 63) - 1
        bad = (errno.EINVAL, errno.EFBIG, errno.EOVERFLOW, errno.ENOSPC)
        for name in ("vm", "disk"):
            fd = os.open(m.path(f"{name}.raw"), os.O_RDWR)
            try:
                cases = [
                    ("pread at 2**63-1", lambda: os.pread(fd, 4096, big)),
                    ("pread at 2**63-4096", lambda: os.pread(fd, 4096, big - 4095)),
                    ("pread at 2**62", lambda: os.pread(fd, 1 << 20, 1 << 62)),
                    ("pread just below the end", lambda: os.pread(fd, 1 << 20, 4 * MiB - 1)),
                    ("pwrite at 2**63-1", lambda: os.pwrite(fd, b"x" * 4096, big)),
                    ("pwrite at 2**63-4096", lambda: os.pwrite(fd, b"x" * 4096, big - 4095)),
                    ("pwrite at the end", lambda: os.pwrite(fd, b"x", 4 * MiB)),
                    ("fallocate huge", lambda: os.posix_fallocate(fd, 1 << 62, 1 << 62)),
                    ("fallocate wrapping", lambda: os.posix_fallocate(fd, big - 10, 100)),
                    ("punch hole huge", lambda: punch(fd, 0, big)),
                    ("punch hole wrapping", lambda: punch(fd, big - 10, 100)),
                    ("truncate to 2**63-1", lambda: os.ftruncate(fd, big)),
                    ("truncate to 2**62", lambda: os.ftruncate(fd, 1 << 62)),
                    ("lseek data at 2**63-1", lambda: os.lseek(fd, big, os.SEEK_DATA)),
                ]
                for what, fn in cases:
                    with self.subTest(image=name, case=what):
                        try:
                            r = fn()
                        except OSError as e:
                            r = e.errno
                            self.assertIn(e.errno, bad + (errno.ENXIO, errno.EOPNOTSUPP),
                                          f"{what}: {e}")
                        if what.startswith("pread") and isinstance(r, bytes):
                            # Short or empty: never data from a wrapped offset.
                            if "below the end" in what:
                                self.assertEqual(len(r), 1)
                            else:
                                self.assertEqual(r, b"")
                        if what.startswith("pwrite"):
                            self.assertIsInstance(r, int)
                            self.assertIn(r, bad, f"{what} returned {r}")
                        self.check_alive(m, name)
                # Whatever was refused, the disk did not change size absurdly and still works.
                size = os.fstat(fd).st_size
                self.assertLess(size, 1 << 62, f"{name}.raw grew to {size}")
                os.pwrite(fd, b"\x99" * 4096, 0)
                os.fsync(fd)
                self.assertEqual(os.pread(fd, 4096, 0), b"\x99" * 4096)
            finally:
                os.close(fd)
        m.stop()
        r = harness.check(self.img("vm.qcow2"))
        self.assertEqual((r["corruptions"], r["check-errors"]), (0, 0), r["text"])


def punch(fd, offset, length):
    """fallocate(PUNCH_HOLE|KEEP_SIZE) via util-linux (Python has no fallocate modes)."""
    p = run(["fallocate", "-p", "-o", str(offset), "-l", str(length), f"/proc/self/fd/{fd}"],
            check=False, pass_fds=(fd,))
    if p.returncode != 0:
        for name, num in (("Invalid argument", errno.EINVAL), ("too large", errno.EFBIG),
                          ("No space", errno.ENOSPC), ("not supported", errno.EOPNOTSUPP)):
            if name in p.stderr:
                raise OSError(num, p.stderr.strip())
        raise OSError(errno.EIO, p.stderr.strip())
    return 0


if __name__ == "__main__":
    harness.main_with_summary("security")
