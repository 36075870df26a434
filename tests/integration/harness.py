"""Shared helpers for the integration tests: mounting imgfs, qemu-img as the oracle, loop devices.

The tests run as root in CI (FUSE, loop devices). Outside CI (CI unset) a test whose tool or
privilege is missing is skipped with a message; in CI that is a failure.
"""

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
IMGFS = os.environ.get("IMGFS_BIN", os.path.join(ROOT, "build", "imgfs"))
IN_CI = bool(os.environ.get("CI"))


def require(condition, what):
    """Skips outside CI, fails in CI, when `condition` is false."""
    if condition:
        return
    if IN_CI:
        raise AssertionError(f"{what} is required in CI but missing")
    raise unittest.SkipTest(f"{what} missing (CI unset, so skipping)")


def require_tools(*tools):
    for t in tools:
        require(shutil.which(t) is not None, t)


def ofd_locked(inode):
    """Whether some process holds an open file description lock (QEMU's image locks) on the
    file with this inode number, from /proc/locks."""
    with open("/proc/locks") as f:
        for line in f:
            words = line.split()
            if len(words) >= 6 and words[1] == "OFDLCK" and words[5].endswith(f":{inode}"):
                return True
    return False


def require_root():
    require(os.geteuid() == 0, "root")
    require(os.path.exists("/dev/fuse"), "/dev/fuse")


def run(cmd, check=True, **kw):
    """Runs a command (list or shell string); returns CompletedProcess with text output."""
    shell = isinstance(cmd, str)
    p = subprocess.run(cmd, shell=shell, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"command failed ({p.returncode}): {cmd}\n{p.stdout}\n{p.stderr}")
    return p


def qemu_img(*args, check=True):
    return run(["qemu-img", *args], check=check)


def qemu_io(image, *cmds, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    args.append(image)
    return run(args)


def convert_raw(image, extra=()):
    with tempfile.NamedTemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None,
                                     delete=False) as t:
        out = t.name
    try:
        qemu_img("convert", *extra, "-O", "raw", image, out)
        with open(out, "rb") as f:
            return f.read()
    finally:
        os.unlink(out)


def check(image):
    """qemu-img check as a dict with corruptions, leaks, check-errors (0 when absent). Raises
    AssertionError if qemu-img could not check the image at all (it did not open, say): a
    test that looks only at corruptions and leaks must not pass on that."""
    p = qemu_img("check", "--output=json", image, check=False)
    try:
        d = json.loads(p.stdout)
    except json.JSONDecodeError:
        if p.returncode == 63:  # a format without checks (raw)
            return {"corruptions": 0, "leaks": 0, "check-errors": 0, "exit": 63,
                    "text": p.stdout + p.stderr}
        raise AssertionError(f"qemu-img check could not check {image} (exit {p.returncode}): "
                             f"{p.stdout}{p.stderr}") from None
    for k in ("corruptions", "leaks", "check-errors"):
        d.setdefault(k, 0)
    d["exit"] = p.returncode
    d["text"] = p.stdout + p.stderr
    return d


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def is_mounted(path):
    path = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == path for line in f)


def kill_all(pattern, timeout=10):
    """SIGKILLs every process whose command line contains `pattern` and waits until they are
    gone. (fio runs its jobs in processes of their own session, so killing its process group
    is not enough.)"""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if run(["pkill", "-9", "-f", pattern], check=False).returncode != 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes matching {pattern} did not exit")


def holders(mountpoint):
    """Processes with files open under `mountpoint` (for failure messages)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(mountpoint):
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read().replace(bytes([0]), b" ").decode()[:80]
                    out.append(f"{pid} {cmd} -> {target}")
        except OSError:
            continue
    return out


def with_test_options(options):
    """`options` plus IMGFS_TEST_MOUNT_OPTIONS (how CI runs a test file again with another
    setting, e.g. threads=2), where `options` does not set the same option itself."""
    extra = [o for o in os.environ.get("IMGFS_TEST_MOUNT_OPTIONS", "").split(",") if o]
    mine = [o for o in options.split(",") if o]
    keys = {o.split("=", 1)[0] for o in mine}
    return ",".join(mine + [o for o in extra if o.split("=", 1)[0] not in keys])


class Mount:
    """imgfs mounted in the foreground (so the test owns the process and its log)."""

    def __init__(self, image_dir, mountpoint=None, options="", extra_args=(), wrapper=(),
                 on_exit=None):
        self.image_dir = image_dir
        self.on_exit = on_exit  # called once the daemon has exited (stop, kill, wait_exit)
        self.wrapper = list(wrapper)  # a command the daemon runs under (e.g. strace ... --)
        self.own_mountpoint = mountpoint is None
        self.mountpoint = mountpoint or tempfile.mkdtemp(prefix="imgfs-mnt-")
        self.options = with_test_options(options)
        self.extra_args = list(extra_args)
        self.unmount_stderr = ""  # what the last `imgfs unmount` of stop() printed
        self.proc = None
        self.log_path = self.mountpoint.rstrip("/") + ".log"

    def start(self, timeout=20):
        args = self.wrapper + [IMGFS, "mount", "-f", "-v"]
        if self.options:
            args += ["-o", self.options]
        args += self.extra_args + [self.image_dir, self.mountpoint]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"imgfs exited early ({self.proc.returncode}):\n{self.read_log()}")
            # The kernel answers requests once INIT is through, before the daemon has settled
            # its transport and said which serves (the ring's entries register meanwhile):
            # ready is that line, "serving DIR on MNT (...) through ...".
            if (is_mounted(self.mountpoint) and os.path.exists(os.path.join(self.mountpoint, ".control"))
                    and re.search(r"info: serving .* through ", self.read_log())):
                self._check_loops()
                return self
            time.sleep(0.05)
        raise AssertionError("imgfs did not mount in time:\n" + self.read_log())

    def _check_loops(self):
        """A threads=N run must really serve the ring with N loops (where the ring serves): with
        the kernel's switch on and the ring not refused, falling back to /dev/fuse would test
        the other transport under this one's name."""
        threads = [o.split("=", 1)[1] for o in self.options.split(",") if o.startswith("threads=")]
        log = self.read_log()
        if threads and "uring=off" not in self.options and uring_switched_on():
            assert "serving through FUSE-over-io_uring" in log, "fell back to /dev/fuse:\n" + log
        if threads and "serving through FUSE-over-io_uring" in log and "kernel keeps" not in log:
            assert f"on {threads[-1]} event loops" in log, log

    def read_log(self):
        try:
            with open(self.log_path) as f:
                return f.read()
        except OSError:
            return ""

    def path(self, *parts):
        return os.path.join(self.mountpoint, *parts)

    def info(self, name):
        with open(self.path(".control", name, "info")) as f:
            return json.loads(f.read())

    def exports(self):
        return sorted(n[:-4] for n in os.listdir(self.mountpoint) if n.endswith(".raw"))

    def stop(self, timeout=60):
        """Unmounts with `imgfs unmount` and requires a clean exit."""
        if self.proc is None:
            return
        if is_mounted(self.mountpoint):
            # A process killed a moment ago may still hold the file (its io_uring requests are
            # torn down asynchronously): retry a busy mount for a while. (`imgfs unmount` also
            # fails when the daemon could not close an image; the exit status below says so.)
            for attempt in range(100):
                p = run([IMGFS, "unmount", self.mountpoint], check=False)
                self.unmount_stderr = p.stderr
                if p.returncode == 0 or not is_mounted(self.mountpoint):
                    break
                time.sleep(0.1)
            else:
                raise AssertionError(f"cannot unmount {self.mountpoint}: {p.stderr}; held by "
                                     f"{holders(self.mountpoint)}")
        code = self.wait_exit(timeout)
        if code != 0:
            raise AssertionError(f"imgfs exited with {code}:\n{self.read_log()}")

    def wait_exit(self, timeout):
        """Waits for the daemon to exit by itself; returns its exit status."""
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self.log.close()
        self.exit_code = code
        self.proc = None
        self._exited()
        return code

    def kill(self, running=True):
        """SIGKILL, as a crash would; then detaches the dead mount. The daemon must still be
        running (one that died by itself before is a failure, not a kill) unless `running` is
        False: the test killed it itself."""
        if running and self.proc.poll() is not None:
            raise AssertionError(f"the daemon had already exited ({self.proc.returncode}) "
                                 f"before the kill:\n{self.read_log()[-3000:]}")
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None
        self.log.close()
        run(["umount", "-l", self.mountpoint], check=False)
        self._exited(killed=True)

    def _exited(self, killed=False):
        if self.on_exit is not None:
            self.on_exit(killed)

    def cleanup(self):
        """Stops a daemon the test left running, whatever state it is in. Returns a reason if
        the daemon died of a signal on the way (a crash, a sanitizer's abort): the test fails
        then, even if it never stopped the mount itself."""
        crash = None
        if self.proc is not None:
            self.exit_code = None
            try:
                self.stop()
            except Exception:
                if self.proc is not None:
                    self.proc.kill()
                run(["umount", "-l", self.mountpoint], check=False)
            code = getattr(self, "exit_code", None)
            if code is not None and code < 0:
                crash = (f"the daemon serving {self.mountpoint} died of signal {-code}; its log "
                         f"ends:\n{self.read_log()[-3000:]}")
        if self.own_mountpoint and not is_mounted(self.mountpoint):
            shutil.rmtree(self.mountpoint, ignore_errors=True)
            try:
                os.unlink(self.log_path)
            except OSError:
                pass
        return crash

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()


def uring_switched_on():
    """Whether the kernel offers FUSE over io_uring (its module parameter)."""
    try:
        with open("/sys/module/fuse/parameters/enable_uring") as f:
            return f.read().strip() == "Y"
    except OSError:
        return False


def detach_loops_under(directory):
    """Detaches the loop devices whose backing file lies under `directory`."""
    p = run(["losetup", "-n", "-O", "NAME,BACK-FILE", "-l"], check=False)
    prefix = os.path.join(os.path.realpath(directory), "")
    for line in p.stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip().startswith(prefix):
            run(["umount", "-l", parts[0]], check=False)  # a filesystem still mounted on it
            run(["losetup", "-d", parts[0]], check=False)


class ImageDirTest(unittest.TestCase):
    """A test with a fresh image directory in self.dir."""

    def setUp(self):
        require_root()
        require_tools("qemu-img", "qemu-io")
        self.dir = tempfile.mkdtemp(prefix="imgfs-it-")
        self.mounts = []

    def tearDown(self):
        # Loop devices a failed test left on our mounts first (only ours: others may be in use).
        for m in self.mounts:
            detach_loops_under(m.mountpoint)
        crashes = [c for c in (m.cleanup() for m in self.mounts) if c]
        shutil.rmtree(self.dir, ignore_errors=True)
        if crashes:
            raise AssertionError("; ".join(crashes))

    def img(self, name):
        return os.path.join(self.dir, name)

    def mount(self, options="", **kw):
        m = Mount(self.dir, options=options, **kw)
        self.mounts.append(m)
        return m.start()

    # The store the images are served from. Here the directory itself; ceph_pool.OnPool serves
    # a Ceph pool holding copies of self.dir's files instead, with the same test bodies.
    def source(self):
        """What `imgfs mount` is given as the image directory."""
        return self.dir

    def store_options(self):
        """Mount options the store needs ("" or "opt=value,...")."""
        return ""

    def sync_store(self):
        """Makes the store hold what self.dir holds (for a mount not made by self.mount())."""

    def pull_store(self):
        """Makes self.dir hold what the store holds, after a daemon not started by
        self.mount() has exited."""

    def layer_url(self, name):
        """What qemu-img opens for the store's image file `name`."""
        return self.img(name)

    def open_layers(self, m):
        """The store's images (as the store names them) the daemon of mount `m` holds open."""
        return set(daemon_files(m))

    def describe_open(self, m, names):
        """What the store says about whether `names` are open, for a failure message."""
        return f"the daemon holds open: {daemon_files(m)}"


def daemon_files(m):
    """The image directory's files the daemon of mount `m` has open, sorted, each once ("X
    (deleted)" for a deleted one): a layer whose reads missed the page cache is open twice,
    the second time O_DIRECT."""
    prefix = os.path.join(os.path.realpath(m.image_dir), "")
    out = []
    for fd in os.listdir(f"/proc/{m.proc.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{m.proc.pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(prefix):
            out.append(target[len(prefix):])
    for name in set(out):
        assert out.count(name) <= 2, f"the daemon holds {name} {out.count(name)} times"
    return sorted(set(out))


def random_writes(path, model, seed, count, max_len=300000):
    """Applies seeded writes (unaligned included) to `path` and to the bytearray `model`."""
    rng = random.Random(seed)
    size = len(model)
    fd = os.open(path, os.O_RDWR)
    try:
        for _ in range(count):
            n = rng.choice([1, 7, 511, 512, 4096, 4097, 65536, 100000, rng.randrange(1, max_len)])
            n = min(n, size)
            off = rng.randrange(0, size - n + 1)
            if rng.random() < 0.5:
                off -= off % 512
            data = rng.randbytes(n)
            os.pwrite(fd, data, off)
            model[off:off + n] = data
        os.fsync(fd)
    finally:
        os.close(fd)


def main():
    unittest.main(verbosity=2)


class _CountingResult(unittest.TextTestResult):
    """Counts checks: every subTest, and every test method that has none."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.checks = 0
        self.failed_checks = 0
        self._subtests = 0

    def startTest(self, test):
        self._subtests = 0
        super().startTest(test)

    def addSubTest(self, test, subtest, err):
        self._subtests += 1
        self.checks += 1
        self.failed_checks += err is not None
        super().addSubTest(test, subtest, err)

    def stopTest(self, test):
        super().stopTest(test)
        if self._subtests == 0:
            self.checks += 1

    def addError(self, test, err):
        self.failed_checks += 1
        self.checks += self._subtests > 0  # failed outside its subtests: one more check
        super().addError(test, err)

    def addFailure(self, test, err):
        self.failed_checks += 1
        self.checks += self._subtests > 0
        super().addFailure(test, err)


def main_with_summary(label):
    """Runs the module's tests, then prints one line: `label: N checks run, P passed` (a check is
    a subTest, or a test method without subtests; skips are named separately), and exits 0
    only if all passed."""
    runner = unittest.TextTestRunner(verbosity=2, resultclass=_CountingResult)
    program = unittest.main(testRunner=runner, exit=False)
    r = program.result
    skipped = f", {len(r.skipped)} skipped" if r.skipped else ""
    print(f"{label}: {r.checks} checks run, {r.checks - r.failed_checks} passed{skipped}",
          flush=True)
    raise SystemExit(0 if r.wasSuccessful() else 1)
