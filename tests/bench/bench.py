#!/usr/bin/env python3
"""imgfs benchmark harness: imgfs against qemu-storage-daemon's FUSE export and qcowmount.

Every contender gets its own copy of the same qcow2 chain (a data-filled qcow2 base with a qcow2
overlay that holds some data of its own), in alternating rounds within one invocation; fio runs
the same jobs against each export file. Two ceilings run beside them: the raw disk as a plain file
(no FUSE at all) and a null FUSE file (qemu-storage-daemon exporting null-co). Also measured: the
commit of a 1 GiB overlay (imgfs online commit against offline `qemu-img commit`) and an ext4
workload on a loop device over each writable export. Peak RSS and CPU seconds of each daemon are
recorded per job. The result is a markdown report (stdout and --out).

--suite rbd runs the same kind of fio jobs on a Ceph pool instead: one throwaway memstore cluster
(tests/ceph/cluster.sh) holds, per contender and round, the chain imported with `rbd import`; imgfs
serves it as rbd:rbd/NAMESPACE, qemu-storage-daemon through QEMU's rbd driver, and rbd-fuse (Ceph's
own FUSE client) a raw RBD image with the same bytes.

Run it through tests/bench/run.sh (installs packages, builds build-rel). Needs root.
"""

import argparse
import atexit
import datetime
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
KIB, MIB, GIB = 1024, 1024 * 1024, 1024 * 1024 * 1024
CLUSTER = 64 * KIB

# Jobs in the order they run against one contender's chain (reads first, the fresh overlay last).
FIO_JOBS = ["randread-qd1", "randread-qd32", "seqread", "randwrite-alloc", "seqwrite", "randwrite-cow",
            "randread-qd1-2j", "randread-qd1-4j", "randread-qd32-2j", "randread-qd32-4j"]
# The transport suite (--suite transport): 4k random reads with 1, 2 and 4 fio jobs.
TRANSPORT_JOBS = ["randread-qd1", "randread-qd32", "randread-qd1-2j", "randread-qd1-4j",
                  "randread-qd32-2j", "randread-qd32-4j"]
# The Ceph suite (--suite rbd): the table's fio jobs that need no local file or fresh overlay.
RBD_JOBS = ["randread-qd1", "randread-qd32", "seqread", "randwrite-alloc", "seqwrite"]
OTHER_JOBS = ["commit", "ext4"]
ALL_JOBS = FIO_JOBS + OTHER_JOBS
WRITE_JOBS = {"randwrite-alloc", "seqwrite", "randwrite-cow"}

JOB_LABEL = {
    "randread-qd1": "4k randread qd1",
    "randread-qd32": "4k randread qd32",
    "seqread": "1M seq read qd8",
    "randwrite-alloc": "4k randwrite qd32, allocated clusters",
    "seqwrite": "1M seq write qd8",
    "randwrite-cow": "4k randwrite qd32, fresh overlay (COW)",
    "randread-qd1-2j": "4k randread qd1, 2 fio jobs",
    "randread-qd1-4j": "4k randread qd1, 4 fio jobs",
    "randread-qd32-2j": "4k randread qd32, 2 fio jobs",
    "randread-qd32-4j": "4k randread qd32, 4 fio jobs",
    "commit": "commit {commit} overlay",
    "ext4": "ext4 on loop: cp -a {tree} + sync",
}
JOB_UNIT = {
    "randread-qd1": "IOPS", "randread-qd32": "IOPS", "randwrite-alloc": "IOPS",
    "randwrite-cow": "IOPS", "seqread": "MiB/s", "seqwrite": "MiB/s",
    "commit": "s", "ext4": "s",
    "randread-qd1-2j": "IOPS", "randread-qd1-4j": "IOPS", "randread-qd32-2j": "IOPS",
    "randread-qd32-4j": "IOPS",
}
LOWER_IS_BETTER = {"commit", "ext4"}

CONTENDERS = ["imgfs", "imgfs-devfuse", "imgfs-2loops", "qsd", "qcowmount", "raw", "null",
              "imgfs-tmpfs", "imgfs-tmpfs-devfuse", "imgfs-tmpfs-2loops", "imgfs-rbd", "qsd-rbd", "rbd-fuse", "imgfs-rbd-raw"]
# The contenders of a run without --contenders: the new ones only in the transport suite.
DEFAULT_CONTENDERS = ["imgfs", "qsd", "qcowmount", "raw", "null"]
TRANSPORT_CONTENDERS = ["imgfs", "imgfs-devfuse", "imgfs-2loops", "qsd", "null", "imgfs-tmpfs",
                        "imgfs-tmpfs-devfuse", "imgfs-tmpfs-2loops"]
# The contenders that serve images from the Ceph cluster the harness starts (--suite rbd).
RBD_CONTENDERS = ["imgfs-rbd", "qsd-rbd", "rbd-fuse", "imgfs-rbd-raw"]
CONTENDER_LABEL = {
    "imgfs": "imgfs",
    "imgfs-devfuse": "imgfs, uring=off (/dev/fuse)",
    "imgfs-tmpfs": "transport: imgfs, raw image on tmpfs",
    "imgfs-tmpfs-devfuse": "transport: imgfs, raw on tmpfs, uring=off",
    "imgfs-2loops": "imgfs, threads=2 (2 event loops)",
    "imgfs-tmpfs-2loops": "transport: imgfs, raw on tmpfs, threads=2",
    "qsd": "qemu-storage-daemon",
    "qcowmount": "qcowmount",
    "raw": "ceiling: raw file, no FUSE",
    "null": "ceiling: null FUSE (qsd null-co)",
    "imgfs-rbd": "imgfs on rbd",
    "qsd-rbd": "qemu-storage-daemon on rbd",
    "rbd-fuse": "rbd-fuse (raw)",
    "imgfs-rbd-raw": "imgfs on rbd, raw image",
}
DAEMONS = ["imgfs", "imgfs-devfuse", "imgfs-2loops", "qsd", "qcowmount", "imgfs-rbd", "qsd-rbd", "rbd-fuse",
           "imgfs-rbd-raw"]
IMGFS_KEYS = ("imgfs", "imgfs-devfuse", "imgfs-2loops", "imgfs-tmpfs", "imgfs-tmpfs-devfuse",
              "imgfs-tmpfs-2loops")
TRANSPORTS = {}  # imgfs contender -> the transport its status named

ARGS = None
WORK = None
LOGDIR = None
IMGFS = None
PROBLEMS = []  # (contender, text), reported at the end
LOAD = ["?", "?", 0.0]  # 1-minute load average: at the start, at the end, highest between jobs
LIVE_PROCS = set()
LOOPS = set()
SHM_DIRS = set()  # raw images of the transport contenders, in RAM
CLUSTERS = set()  # directories of Ceph clusters started by cluster.sh (stopped by cleanup_all)
CLUSTER_SH = ROOT / "tests" / "ceph" / "cluster.sh"
RBD_POOL = "rbd"  # the pool cluster.sh creates
CEPH = {}  # the running cluster: dir, conf, osd_pid, port; or error (why it did not start)


class StepError(Exception):
    pass


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def problem(who, text):
    text = " ".join(str(text).split())
    if len(text) > 400:
        text = text[:400] + " ..."
    PROBLEMS.append((who, text))
    log(f"PROBLEM {who}: {text}")


def human(n):
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n / MIB:.0f} MiB"


def parse_size(s):
    m = re.fullmatch(r"(\d+)([KMGkmg]?)", s.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (use e.g. 512M, 2G)")
    return int(m.group(1)) * {"": 1, "K": KIB, "M": MIB, "G": GIB}[m.group(2).upper()]


# ---------------------------------------------------------------------------------------------
# Running commands

def _short(argv):
    text = " ".join(map(str, argv))
    return text if len(text) <= 200 else text[:200] + " ..."


def _reap(p, timeout):
    """Kills p and waits a bounded time (a process stuck on a dead FUSE mount may not die)."""
    try:
        p.kill()
    except ProcessLookupError:
        pass
    try:
        p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"warning: pid {p.pid} ({p.args[0]}) does not die; left behind")
    except (ValueError, OSError):
        pass


def run(argv, timeout, check=True, cwd=None, on_timeout=None):
    """Runs argv with a time limit; raises StepError on timeout or (with check) non-zero exit.
    on_timeout runs before the child is killed (e.g. to abort the FUSE connection it hangs on)."""
    argv = [str(a) for a in argv]
    try:
        p = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    except FileNotFoundError as e:
        raise StepError(f"not found: {e.filename}")
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        if on_timeout is not None:
            on_timeout()
        _reap(p, 30)
        raise StepError(f"timed out after {timeout}s: {_short(argv)}")
    except BaseException:
        _reap(p, 10)
        raise
    p.stdout, p.stderr = out, err
    if check and p.returncode != 0:
        msg = (err or "").strip() or (out or "").strip()
        raise StepError(f"{_short(argv)} exited {p.returncode}: {msg[-600:]}")
    return p


def run_rusage(argv, timeout, cwd=None):
    """Runs argv and returns (elapsed_s, peak_rss_kib, cpu_s) of that child alone (wait4)."""
    log_path = LOGDIR / f"{Path(str(argv[0])).name}-{time.time_ns()}.log"
    with open(log_path, "wb") as out:
        t0 = time.monotonic()
        p = subprocess.Popen([str(a) for a in argv], cwd=cwd, stdin=subprocess.DEVNULL,
                             stdout=out, stderr=subprocess.STDOUT)
        try:
            while True:
                pid, status, ru = os.wait4(p.pid, os.WNOHANG)
                if pid == p.pid:
                    break
                if time.monotonic() - t0 > timeout:
                    p.kill()
                    os.wait4(p.pid, 0)
                    p.returncode = -9
                    raise StepError(f"timed out after {timeout}s: {' '.join(map(str, argv))}")
                time.sleep(0.02)
        except BaseException:
            if p.returncode is None:
                p.kill()
                try:
                    os.wait4(p.pid, 0)
                except ChildProcessError:
                    pass
                p.returncode = -9
            raise
        elapsed = time.monotonic() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise StepError(f"{' '.join(map(str, argv))} exited {p.returncode}: "
                        f"{log_path.read_text(errors='replace')[-600:]}")
    return elapsed, ru.ru_maxrss, ru.ru_utime + ru.ru_stime


class Daemon:
    """A background process in its own session (so Ctrl-C reaches only us; we stop it)."""

    def __init__(self, name, argv, cwd=None):
        self.name = name
        self.log_path = LOGDIR / f"{name}-{time.time_ns()}.log"
        self.log_file = open(self.log_path, "wb")
        self.argv = [str(a) for a in argv]
        self.proc = subprocess.Popen(self.argv, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=self.log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.pid = self.proc.pid
        LIVE_PROCS.add(self)

    def alive(self):
        return self.proc.poll() is None

    def log_tail(self, n=600):
        try:
            return self.log_path.read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    def wait(self, timeout):
        try:
            self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill(self, grace=10):
        if self.alive():
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            if not self.wait(grace):
                try:
                    self.proc.kill()
                except ProcessLookupError:
                    pass
                self.wait(10)
        self.log_file.close()
        LIVE_PROCS.discard(self)


# ---------------------------------------------------------------------------------------------
# Mounts, loop devices, cleanup

def _unescape(s):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mounts():
    """(mountpoint, fstype, 'maj:min') from /proc/self/mountinfo (never stats a mount)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            out.append((_unescape(fields[4]), right.split()[0], fields[2]))
    return out


def is_mounted(path, fstype_prefix=None):
    path = str(path)
    return any(mp == path and (fstype_prefix is None or fs.startswith(fstype_prefix))
               for mp, fs, _ in mounts())


def fuse_abort(path):
    """Aborts the FUSE connection behind a mountpoint (for a hung daemon)."""
    for mp, fs, dev in mounts():
        if mp == str(path) and fs.startswith("fuse"):
            major, minor = (int(x) for x in dev.split(":"))
            conn = Path(f"/sys/fs/fuse/connections/{os.makedev(major, minor)}/abort")
            try:
                conn.write_text("1")
            except OSError:
                pass


def abort_all_fuse():
    """Aborts every FUSE connection under the scratch directory (unblocks whatever hangs on it)."""
    for mp, fs, _ in mounts():
        if fs.startswith("fuse") and mp.startswith(str(WORK) + "/"):
            fuse_abort(mp)


def force_unmount(path, fuse):
    """Unmounts path whatever state it is in."""
    path = str(path)
    for attempt in range(3):
        if not is_mounted(path):
            return
        cmds = ([["fusermount3", "-u", path], ["umount", path]] if fuse else [["umount", path]])
        for cmd in cmds:
            try:
                run(cmd, timeout=20, check=False)
            except StepError:
                pass
            if not is_mounted(path):
                return
        if fuse:
            fuse_abort(path)
        elif attempt == 0:
            # a filesystem on a loop device over a hung FUSE file cannot flush: unblock it
            abort_all_fuse()
        time.sleep(0.5)
    try:
        run(["umount", "-l", path], timeout=30, check=False)
    except StepError:
        pass


def loops_under(prefix):
    """Loop devices whose backing file lies under prefix."""
    found = []
    try:
        p = run(["losetup", "-n", "-l", "-O", "NAME,BACK-FILE"], timeout=30, check=False)
    except StepError:
        return found
    for line in p.stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip().startswith(str(prefix)):
            found.append(parts[0])
    return found


def detach_loop(dev):
    for _ in range(20):
        try:
            run(["losetup", "-d", dev], timeout=30, check=False)
        except StepError:
            pass
        p = run(["losetup", "-n", "-O", "NAME", "-l"], timeout=30, check=False)
        if dev not in p.stdout.split():
            break
        time.sleep(0.25)
    LOOPS.discard(dev)


_cleaned = False


def cleanup_all():
    """Leaves no mount, loop device or daemon behind. Safe to call more than once."""
    global _cleaned
    if _cleaned or WORK is None:
        return
    _cleaned = True
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second Ctrl-C must not
        signal.signal(sig, signal.SIG_IGN)                      # leave mounts behind
    prefix = str(WORK)
    try:
        # 1. filesystems on loop devices (mounted under WORK), deepest first
        for mp, fs, _ in sorted(mounts(), key=lambda m: -len(m[0])):
            if mp.startswith(prefix + "/") and not fs.startswith("fuse"):
                force_unmount(mp, fuse=False)
        # 2. loop devices on files under WORK
        for dev in set(loops_under(prefix)) | set(LOOPS):
            detach_loop(dev)
        # 3. FUSE mounts under WORK: ask the daemon (SIGTERM unmounts for qsd), then force
        for d in list(LIVE_PROCS):
            if d.name.startswith("imgfs"):
                for mp, fs, _ in mounts():
                    if mp.startswith(prefix + "/") and fs.startswith("fuse.imgfs"):
                        try:
                            run([IMGFS, "unmount", mp], timeout=30, check=False)
                        except StepError:
                            pass
        for d in list(LIVE_PROCS):
            d.kill()
        for mp, fs, _ in sorted(mounts(), key=lambda m: -len(m[0])):
            if mp.startswith(prefix + "/"):
                force_unmount(mp, fuse=fs.startswith("fuse"))
    finally:
        # 4. the Ceph cluster, once no client of it is left
        for cdir in list(CLUSTERS):
            stop_ceph(cdir)
        for shm in list(SHM_DIRS):
            shutil.rmtree(shm, ignore_errors=True)
            SHM_DIRS.discard(shm)
        if not ARGS.keep and not any(mp.startswith(prefix + "/") for mp, _, _ in mounts()):
            shutil.rmtree(prefix, ignore_errors=True)
        elif ARGS.keep:
            log(f"kept {prefix}")


def _on_signal(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------------------------------------
# /proc sampling: peak RSS (VmHWM, reset per job through clear_refs) and CPU seconds

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def proc_mem(pid):
    """(VmRSS KiB, VmHWM KiB) or None."""
    try:
        rss = hwm = None
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
        return rss, hwm
    except (OSError, ValueError, IndexError):
        return None


class Meter:
    """Peak RSS and CPU seconds of one process over a with-block (with rss=False: CPU only,
    and the process's VmHWM is left as it is)."""

    def __init__(self, pid, rss=True):
        self.pid = pid
        self.rss = rss
        self.peak_kib = 0
        self.cpu_s = None
        self._stop = threading.Event()

    def __enter__(self):
        if self.pid is None:
            return self
        if self.rss:
            try:
                Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # resets VmHWM to VmRSS
            except OSError:
                pass  # then the sampled VmRSS (and VmHWM since start) have to do
        self.cpu0 = proc_cpu(self.pid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._take()
            self._stop.wait(0.2)

    def _take(self):
        if not self.rss:
            return
        m = proc_mem(self.pid)
        if m:
            self.peak_kib = max(self.peak_kib, m[0] or 0, m[1] or 0)

    def __exit__(self, *exc):
        if self.pid is None:
            return False
        self._stop.set()
        self._thread.join()
        self._take()
        cpu1 = proc_cpu(self.pid)
        if self.cpu0 is not None and cpu1 is not None:
            self.cpu_s = cpu1 - self.cpu0
        return False

    def result(self):
        if self.pid is None or self.cpu_s is None:
            return None
        return (self.peak_kib, self.cpu_s)


def enable_uring():
    try:
        return Path("/sys/module/fuse/parameters/enable_uring").read_text().strip()
    except OSError:
        return "absent (kernel without FUSE over io_uring)"


def loadavg():
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def drop_caches():
    la = loadavg()
    if la is not None:
        LOAD[2] = max(LOAD[2], la)
    if ARGS.no_drop_caches:
        return
    try:
        run(["sync"], timeout=600)
    except StepError as e:
        log(f"warning: {e}")
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError as e:
        log(f"warning: drop_caches: {e}")


def wait_until(pred, timeout, what, daemon=None):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return
        if daemon is not None and not daemon.alive():
            raise StepError(f"{daemon.name} exited with {daemon.proc.returncode} while waiting for "
                            f"{what}: {daemon.log_tail()}")
        time.sleep(0.05)
    raise StepError(f"timed out after {timeout}s waiting for {what}"
                    + (f": {daemon.log_tail()}" if daemon else ""))


def copy_file(src, dst):
    run(["cp", "--reflink=auto", "--sparse=always", src, dst], timeout=ARGS.step_timeout)


# ---------------------------------------------------------------------------------------------
# Contenders. start() prepares its copy in dir d and leaves self.target (the file fio uses);
# new_overlay() puts an empty qcow2 overlay on top; stop() undoes start().

class Contender:
    key = ""
    daemon = None
    target = None
    reads_only = False
    only_jobs = None  # a set: the jobs this contender runs (None: all it can)
    only_reason = "transport jobs only"  # why the other jobs are n/a
    aborted = False

    def pid(self):
        return self.daemon.pid if self.daemon and self.daemon.alive() else None

    def osd_pid(self):
        return None  # the Ceph OSD serving this contender, if any (its CPU is recorded too)

    def check_alive(self):
        if self.daemon is not None and not self.daemon.alive():
            raise StepError(f"{self.key} daemon exited with {self.daemon.proc.returncode}: "
                            f"{self.daemon.log_tail()}")

    def new_overlay(self):
        pass

    def check_content(self):
        """The export shows the chain: overlay data at the start, base data at the end."""
        fd = os.open(self.target, os.O_RDONLY)
        try:
            checks = [(0, 0x5A, "overlay")]
            if ARGS.prefill < ARGS.disk_size:
                checks.append((ARGS.disk_size - 4096, 0xA5, "base"))
            for off, byte, what in checks:
                got = os.pread(fd, 4096, off)
                if got != bytes([byte]) * 4096:
                    raise StepError(f"{self.target.name} at {off} does not show the {what} data "
                                    f"(0x{byte:02x}): got {got[:8].hex()}...")
        finally:
            os.close(fd)

    def abort(self):
        """Called when a step on this contender timed out: fail whatever hangs on its mount."""
        mp = getattr(self, "mnt", None) or getattr(self, "export", None)
        self.aborted = True
        if mp is not None:
            log(f"{self.key}: aborting the FUSE connection on {mp}")
            fuse_abort(mp)

    def stop(self):
        pass


def copy_chain(src, d, overlay):
    img = d / "img"
    img.mkdir(parents=True)
    copy_file(src / "base.qcow2", img / "base.qcow2")
    copy_file(src / overlay, img / overlay)
    return img


class Imgfs(Contender):
    key = "imgfs"
    transport_option = None  # None: the default (uring=auto); else the uring= value
    threads_option = None  # None: the default; else the threads= value

    def start(self, d, src, overlay="disk.qcow2"):
        self.img = copy_chain(src, d, overlay)
        self._mount(d, overlay.split(".")[0])

    def _mount(self, d, name):
        self.name = name
        self.mnt = d / "mnt"
        self.mnt.mkdir()
        opts = self.extra_options() + [o for o in ARGS.imgfs_options.split(",") if o]
        if self.transport_option:
            opts = [o for o in opts if not o.startswith("uring=")]
            opts.append(f"uring={self.transport_option}")
        if self.threads_option:
            opts = [o for o in opts if not o.startswith("threads=")]
            opts.append(f"threads={self.threads_option}")
        opts = ["-o", ",".join(opts)] if opts else []
        self.daemon = Daemon(self.key, [IMGFS, "mount", "-f"] + opts + [self.img, self.mnt])
        self.target = self.mnt / f"{self.name}.raw"
        wait_until(lambda: is_mounted(self.mnt, "fuse") and self.target.exists(), 60,
                   f"{self.key} to export {self.target}", self.daemon)
        info = json.loads((self.mnt / ".control" / self.name / "info").read_text())
        transport = info.get("transport", "?")
        TRANSPORTS.setdefault(self.key, set()).add(transport)
        log(f"{self.key}: transport {transport}")

    def extra_options(self):
        return []

    def control(self, what, text):
        path = self.mnt / ".control" / self.name / what
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, text.encode())
        except OSError as e:
            info = (self.mnt / ".control" / self.name / "info").read_text()
            raise StepError(f"imgfs {what} {text!r}: {e}; info: {info[-400:]}")
        finally:
            os.close(fd)

    def job_state(self):
        txt = (self.mnt / ".control" / self.name / "job").read_text().strip()
        return json.loads(txt) if txt else None

    def new_overlay(self):
        self.control("snapshot", "cow\n")
        if not (self.img / f"{self.name}@cow.qcow2").exists():
            raise StepError("imgfs snapshot did not create the overlay file")

    def stop(self):
        if self.daemon is None:
            return
        if is_mounted(self.mnt) and not self.aborted:
            # A loop device just detached lets go of its file a moment later (the kernel
            # closes it from a work queue): until then the unmount is busy, so retry a while.
            for attempt in range(50):
                try:
                    run([IMGFS, "unmount", self.mnt], timeout=60)
                    break
                except StepError as e:
                    if "busy" not in str(e).lower() or attempt == 49:
                        problem(self.key, f"unmount: {e}")
                        break
                    time.sleep(0.2)
        if not self.daemon.wait(5 if self.aborted else 60):
            problem(self.key, "daemon still running after unmount; killed")
        self.daemon.kill(grace=2 if self.aborted else 10)
        force_unmount(self.mnt, fuse=True)
        self.daemon = None


class ImgfsDevFuse(Imgfs):
    key = "imgfs-devfuse"
    transport_option = "off"


class Imgfs2Loops(Imgfs):
    key = "imgfs-2loops"
    threads_option = 2


class ImgfsTmpfs(Imgfs):
    """The transport alone: imgfs serving a raw image that lives in RAM (tmpfs), so that what
    is measured is the FUSE round trip and imgfs's request path, not a disk."""
    key = "imgfs-tmpfs"
    only_jobs = set(TRANSPORT_JOBS)

    def start(self, d, src, overlay=None):
        self.shm = Path(tempfile.mkdtemp(prefix="imgfs-bench.", dir="/dev/shm"))
        SHM_DIRS.add(self.shm)
        self.img = self.shm / "img"
        self.img.mkdir()
        copy_file(src / "disk.raw", self.img / "t.img")
        self._mount(d, "t")

    def check_content(self):
        pass  # a raw copy: its bytes are the chain's, nothing layered to check

    def stop(self):
        super().stop()
        shutil.rmtree(self.shm, ignore_errors=True)
        SHM_DIRS.discard(self.shm)


class ImgfsTmpfsDevFuse(ImgfsTmpfs):
    key = "imgfs-tmpfs-devfuse"
    transport_option = "off"


class ImgfsTmpfs2Loops(ImgfsTmpfs):
    key = "imgfs-tmpfs-2loops"
    threads_option = 2


def qsd_argv(export, blockdevs, node):
    argv = ["qemu-storage-daemon"]
    for b in blockdevs:
        argv += ["--blockdev", b]
    argv += ["--export", f"type=fuse,id=e,node-name={node},mountpoint={export},writable=on"]
    return argv


class Qsd(Contender):
    key = "qsd"

    def start(self, d, src, overlay="disk.qcow2"):
        self.img = copy_chain(src, d, overlay)
        self.export = d / "export"
        self.export.touch()
        self._launch(self.img / overlay)

    def _launch(self, top):
        self.daemon = Daemon("qsd", qsd_argv(self.export, [
            f"driver=file,node-name=f,filename={top},aio=io_uring,cache.direct=off",
            "driver=qcow2,node-name=q,file=f"], "q"))
        wait_until(lambda: is_mounted(self.export, "fuse"), 60,
                   "qemu-storage-daemon to export", self.daemon)
        self.target = self.export

    def new_overlay(self):
        # qemu-storage-daemon has no control file: stop it, add an empty overlay, restart on it.
        self.stop()
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "disk.qcow2", "-F", "qcow2",
             "cow.qcow2"], timeout=120, cwd=self.img)
        self._launch(self.img / "cow.qcow2")

    def stop(self):
        if self.daemon is None:
            return
        self.daemon.kill(grace=5 if self.aborted else 60)  # SIGTERM: flush, unexport, exit
        force_unmount(self.export, fuse=True)
        self.daemon = None


class Qcowmount(Contender):
    key = "qcowmount"
    reads_only = True

    def start(self, d, src, overlay="disk.qcow2"):
        if shutil.which("qcowmount") is None:
            raise StepError("qcowmount not installed (package libqcow-utils)")
        self.img = copy_chain(src, d, overlay)
        self.mnt = d / "mnt"
        self.mnt.mkdir()
        # -v keeps it in the foreground (so we know its pid); it logs little.
        self.daemon = Daemon("qcowmount", ["qcowmount", "-v", self.img / overlay, self.mnt],
                             cwd=self.img)
        wait_until(lambda: is_mounted(self.mnt, "fuse"), 60, "qcowmount to mount", self.daemon)
        # It shows every layer of the chain as qcow1..qcowN, base first: the last is the disk.
        names = sorted((p.name for p in self.mnt.iterdir() if re.fullmatch(r"qcow\d+", p.name)),
                       key=lambda n: int(n[4:]))
        if not names:
            raise StepError(f"qcowmount shows no qcowN file: {os.listdir(self.mnt)}")
        self.target = self.mnt / names[-1]
        size = self.target.stat().st_size
        if size != ARGS.disk_size:
            raise StepError(f"qcowmount's {names[-1]} has size {size}, expected {ARGS.disk_size}")

    def stop(self):
        if self.daemon is None:
            return
        try:
            run(["umount", self.mnt], timeout=60, check=False)
        except StepError:
            pass
        if not self.daemon.wait(5 if self.aborted else 30):
            problem("qcowmount", "still running after unmount; killed")
        self.daemon.kill()
        force_unmount(self.mnt, fuse=True)
        self.daemon = None


class Raw(Contender):
    key = "raw"

    def start(self, d, src, overlay=None):
        self.target = d / "disk.raw"
        copy_file(src / "disk.raw", self.target)


class Null(Contender):
    key = "null"

    def start(self, d, src, overlay=None):
        self.export = d / "export"
        self.export.touch()
        self.daemon = Daemon("qsd-null", qsd_argv(self.export, [
            f"driver=null-co,node-name=n,size={ARGS.disk_size},read-zeroes=on"], "n"))
        wait_until(lambda: is_mounted(self.export, "fuse"), 60,
                   "qemu-storage-daemon (null-co) to export", self.daemon)
        self.target = self.export

    def pid(self):
        return None  # a ceiling: its daemon is not in the RSS/CPU table

    def stop(self):
        if self.daemon is None:
            return
        self.daemon.kill(grace=5 if self.aborted else 30)
        force_unmount(self.export, fuse=True)
        self.daemon = None


# ---------------------------------------------------------------------------------------------
# The Ceph suite: one throwaway cluster (tests/ceph/cluster.sh: one monitor, one OSD keeping its
# objects in RAM, pool "rbd" of size 1) for the whole run; in it, one RBD namespace per contender
# and round, holding that contender's copy of the chain, removed again when the contender stops
# (so that the OSD's RAM holds one contender's images at a time).

def free_port():
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def start_ceph():
    """Starts the cluster in WORK/ceph. If it does not start, CEPH["error"] says why: the rbd
    contenders are then reported n/a and the others run."""
    cdir = WORK / "ceph"
    CLUSTERS.add(cdir)  # before the start: a timeout or Ctrl-C half way through still stops it
    port = free_port()
    log(f"starting a Ceph cluster on port {port} (memstore OSD of {ARGS.osd_mib} MiB)")
    try:
        # Ceph's usual 5 op shards: the tests run one (see cluster.sh), which would make the
        # OSD, shared by every contender, the bottleneck sooner.
        p = run([CLUSTER_SH, "start", cdir, "--port", port, "--osd-mib", ARGS.osd_mib,
                 "--op-shards", "5"], timeout=180)
        conf = p.stdout.strip().splitlines()[-1]
        CEPH.update(dir=cdir, conf=conf, port=port,
                    osd_pid=int((cdir / "osd.pid").read_text().strip()))
        log(f"Ceph: {conf}, OSD pid {CEPH['osd_pid']}; {(p.stderr or '').strip()}")
    except (StepError, OSError, ValueError, IndexError) as e:
        CEPH["error"] = str(e)
        problem("ceph", f"the cluster did not start: {e}")


def stop_ceph(cdir):
    """Stops a cluster by the PIDs it recorded (cluster.sh stop); kills what is left itself."""
    try:
        run([CLUSTER_SH, "stop", cdir], timeout=60, check=False)
    except StepError as e:
        log(f"warning: cluster.sh stop {cdir}: {e}")
    for name in ("osd", "mon"):
        try:
            pid = int((Path(cdir) / f"{name}.pid").read_text().strip())
            os.kill(pid, signal.SIGKILL)
            log(f"warning: ceph-{name} (pid {pid}) outlived cluster.sh stop; killed")
        except (OSError, ValueError):
            pass
    CLUSTERS.discard(cdir)


def ceph_osd_pid():
    pid = CEPH.get("osd_pid")
    return pid if pid is not None and proc_cpu(pid) is not None else None


def ceph_check():
    """Raises StepError unless both daemons of the cluster run (an OSD gone, e.g. out of
    memory, would otherwise show as a hang or an I/O error of whichever contender is next)."""
    if "conf" not in CEPH:
        raise StepError(f"no Ceph cluster: {CEPH.get('error', 'not started')}")
    if "hung" in CEPH:
        raise StepError(f"the Ceph cluster stopped answering earlier: {CEPH['hung']}")
    for name, log_name in (("mon", "mon.a.log"), ("osd", "osd.0.log")):
        pid_file = CEPH["dir"] / f"{name}.pid"
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            try:
                tail = (CEPH["dir"] / log_name).read_text(errors="replace")[-400:]
            except OSError:
                tail = ""
            raise StepError(f"the Ceph {name} daemon is gone: {tail}")


def rbd(args, timeout=None, check=True):
    try:
        return run(["rbd", "--conf", CEPH["conf"]] + list(args),
                   timeout=timeout or ARGS.step_timeout, check=check)
    except StepError as e:
        if "timed out" in str(e):
            CEPH["hung"] = str(e)  # the next contenders fail at once instead of timing out too
        raise


def log_osd_rss(what):
    pid = ceph_osd_pid()
    m = proc_mem(pid) if pid else None
    if m:
        log(f"ceph-osd RSS {m[0] / 1024:.0f} MiB {what}")


def rbd_namespace(ns):
    ceph_check()
    rbd(["namespace", "create", f"{RBD_POOL}/{ns}"], timeout=60)


def rbd_put_chain(src, d, ns, overlay="disk.qcow2"):
    """Imports the table's chain into namespace ns, byte for byte, as base.qcow2 and overlay:
    only the overlay's backing name is rewritten (`qemu-img rebase -u` on a local copy) to
    QEMU's form, rbd:POOL/NS/base.qcow2, as a chain made in the pool by qemu-img has it."""
    rbd_namespace(ns)
    top = d / overlay
    copy_file(src / overlay, top)
    run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", f"rbd:{RBD_POOL}/{ns}/base.qcow2",
         "-F", "qcow2", top], timeout=120)
    for path, image in ((src / "base.qcow2", "base.qcow2"), (top, overlay)):
        rbd(["import", "--no-progress", path, f"{RBD_POOL}/{ns}/{image}"])
    top.unlink()
    log_osd_rss(f"with {ns} imported")


def rbd_drop(ns):
    """Removes namespace ns with its images. An image whose client was killed keeps a watcher
    until the OSD times it out (5 s in cluster.sh's configuration): retried meanwhile."""
    if "conf" not in CEPH or "hung" in CEPH or ceph_osd_pid() is None:
        return  # nothing to remove, or no cluster to remove it from
    try:
        p = rbd(["ls", f"{RBD_POOL}/{ns}"], timeout=60, check=False)
        if p.returncode != 0:
            return  # no such namespace: nothing was imported
        log_osd_rss(f"with {ns} after its jobs")
        for image in p.stdout.split():
            for attempt in range(40):
                p = rbd(["rm", "--no-progress", f"{RBD_POOL}/{ns}/{image}"], timeout=120,
                        check=False)
                if p.returncode == 0:
                    break
                if attempt == 39:
                    raise StepError(f"rbd rm {ns}/{image}: {(p.stderr or '').strip()[-300:]}")
                time.sleep(1)
        rbd(["namespace", "rm", f"{RBD_POOL}/{ns}"], timeout=60)
        log_osd_rss(f"with {ns} removed")
    except StepError as e:
        problem("ceph", f"could not remove namespace {ns} (its data stays in the OSD's RAM): {e}")


RBD_ONLY_JOBS = set(FIO_JOBS) - {"randwrite-cow"}


class InPool:
    """Mixin of the contenders served from the cluster: the OSD's CPU is theirs too, and their
    namespace goes when they stop."""
    ns = None
    only_jobs = RBD_ONLY_JOBS
    only_reason = "not in the rbd suite"

    def osd_pid(self):
        return ceph_osd_pid()

    def stop(self):
        try:
            super().stop()
        finally:
            if self.ns:
                rbd_drop(self.ns)


class ImgfsRbd(InPool, Imgfs):
    """imgfs serving the pool namespace rbd:rbd/NS, where each RBD image is what a file is in
    a directory: MNT/disk.raw is the chain disk.qcow2 -> base.qcow2."""
    key = "imgfs-rbd"

    def start(self, d, src, overlay="disk.qcow2"):
        self.ns = d.name
        rbd_put_chain(src, d, self.ns, overlay)
        self.img = f"rbd:{RBD_POOL}/{self.ns}"
        self._mount(d, overlay.split(".")[0])

    def extra_options(self):
        return [f"ceph_conf={CEPH['conf']}"]



class ImgfsRbdRaw(ImgfsRbd):
    """imgfs serving the flattened raw RBD image rbd-fuse serves: the
    same path without qcow2, to tell the format's cost from the transport's."""
    key = "imgfs-rbd-raw"

    def start(self, d, src, overlay=None):
        self.ns = d.name
        rbd_namespace(self.ns)
        rbd(["import", "--no-progress", src / "disk.raw", f"{RBD_POOL}/{self.ns}/disk.raw"])
        self.img = f"rbd:{RBD_POOL}/{self.ns}"
        self._mount(d, "disk")


class QsdRbd(InPool, Qsd):
    """qemu-storage-daemon with QEMU's rbd driver: one rbd node per image, qcow2 on each, the
    overlay's backing given as the base's qcow2 node (QEMU resolves no backing name itself
    here), exported like the local chain."""
    key = "qsd-rbd"

    def start(self, d, src, overlay="disk.qcow2"):
        self.ns = d.name
        rbd_put_chain(src, d, self.ns, overlay)
        self.export = d / "export"
        self.export.touch()

        def image(name, node):
            # cache.direct=off, as for the local files: librbd's cache stays on (QEMU turns
            # rbd_cache off only for cache.direct=on), as it is for imgfs and rbd-fuse
            return (f"driver=rbd,node-name={node},pool={RBD_POOL},namespace={self.ns},"
                    f"image={name},conf={CEPH['conf']},cache.direct=off")

        self.daemon = Daemon(self.key, qsd_argv(self.export, [
            image("base.qcow2", "rb"), "driver=qcow2,node-name=qb,file=rb",
            image(overlay, "rt"), "driver=qcow2,node-name=q,file=rt,backing=qb"], "q"))
        wait_until(lambda: is_mounted(self.export, "fuse"), 60,
                   "qemu-storage-daemon (rbd) to export", self.daemon)
        self.target = self.export



class RbdFuse(Contender):
    """Ceph's own FUSE client: every RBD image of a pool namespace as a file. It serves raw
    images only, so it gets the chain flattened (the raw conversion) as image `disk`."""
    key = "rbd-fuse"
    only_jobs = RBD_ONLY_JOBS
    only_reason = "not in the rbd suite"

    def start(self, d, src, overlay=None):
        self.ns = d.name
        if shutil.which("rbd-fuse") is None:
            raise StepError("rbd-fuse not installed (package rbd-fuse)")
        rbd_namespace(self.ns)
        rbd(["import", "--no-progress", src / "disk.raw", f"{RBD_POOL}/{self.ns}/disk"])
        log_osd_rss(f"with {self.ns} imported")
        self.mnt = d / "mnt"
        self.mnt.mkdir()
        # -f (libfuse): in the foreground, so that we know its pid; -s: the namespace
        self.daemon = Daemon(self.key, ["rbd-fuse", "-c", CEPH["conf"], "-p", RBD_POOL,
                                        "-s", self.ns, self.mnt, "-f"])
        self.target = self.mnt / "disk"
        wait_until(lambda: is_mounted(self.mnt, "fuse") and self.target.exists(), 60,
                   f"rbd-fuse to show {self.target}", self.daemon)
        size = self.target.stat().st_size
        if size != ARGS.disk_size:
            raise StepError(f"rbd-fuse's disk has size {size}, expected {ARGS.disk_size}")

    def osd_pid(self):
        return ceph_osd_pid()

    def stop(self):
        try:
            if self.daemon is not None:
                try:
                    run(["umount", self.mnt], timeout=60, check=False)
                except StepError:
                    pass
                if not self.daemon.wait(5 if self.aborted else 30):
                    problem(self.key, "still running after unmount; killed")
                self.daemon.kill()
                force_unmount(self.mnt, fuse=True)
                self.daemon = None
        finally:
            rbd_drop(self.ns)


CLASSES = {"imgfs": Imgfs, "imgfs-devfuse": ImgfsDevFuse, "imgfs-2loops": Imgfs2Loops,
           "imgfs-tmpfs-2loops": ImgfsTmpfs2Loops, "qsd": Qsd, "qcowmount": Qcowmount,
           "raw": Raw, "null": Null, "imgfs-tmpfs": ImgfsTmpfs,
           "imgfs-tmpfs-devfuse": ImgfsTmpfsDevFuse, "imgfs-rbd": ImgfsRbd, "qsd-rbd": QsdRbd,
           "rbd-fuse": RbdFuse, "imgfs-rbd-raw": ImgfsRbdRaw}


# ---------------------------------------------------------------------------------------------
# Preparing the source chain (once)

def qemu_io_fill(image, fmt, start, length, pattern):
    step = 64 * MIB
    cmds = []
    off = start
    while off < start + length:
        n = min(step, start + length - off)
        cmds += ["-c", f"write -P {pattern} {off} {n}"]
        off += n
    run(["qemu-io", "-f", fmt] + cmds + [image], timeout=3600)


def prepare_sources(src):
    src.mkdir(parents=True)
    size = ARGS.disk_size
    commit = "commit" in ARGS.jobs
    log(f"creating the qcow2 chain: {human(size)} base filled with data, overlay with "
        f"{human(ARGS.prefill)}"
        + (f", commit overlay with {human(ARGS.commit_size)}" if commit else ""))
    run(["qemu-img", "create", "-q", "-f", "qcow2", src / "base.qcow2", str(size)], timeout=60)
    qemu_io_fill(src / "base.qcow2", "qcow2", 0, size, "0xa5")
    for name, amount, pattern in (("disk.qcow2", ARGS.prefill, "0x5a"),
                                  ("cdisk.qcow2", ARGS.commit_size, "0x3c")):
        if name == "cdisk.qcow2" and not commit:
            continue  # only the commit test uses it
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", name],
            timeout=60, cwd=src)
        qemu_io_fill(src / name, "qcow2", 0, amount, pattern)
    needs_raw = ({"raw", "imgfs-tmpfs", "imgfs-tmpfs-devfuse", "imgfs-tmpfs-2loops", "rbd-fuse",
                  "imgfs-rbd-raw"}
                 & set(ARGS.contenders))
    if any(j in ARGS.jobs for j in FIO_JOBS + ["ext4"]) and needs_raw:
        log("converting the chain to a raw file (ceiling)")
        run(["qemu-img", "convert", "-O", "raw", src / "disk.qcow2", src / "disk.raw"],
            timeout=3600)
    # The fresh-overlay job replays one 4 KiB write into every 64 KiB cluster, in random order,
    # so that every write is a first write to its cluster (copy-on-write from the backing).
    rnd = random.Random(20240601)
    n = size // CLUSTER
    offs = [i * CLUSTER + rnd.randrange(CLUSTER // (4 * KIB)) * 4 * KIB for i in range(n)]
    rnd.shuffle(offs)
    with open(src / "cow.iolog", "w") as f:
        f.write("fio version 2 iolog\nbench-target add\nbench-target open\n")
        for o in offs:
            f.write(f"bench-target write {o} 4096\n")
        f.write("bench-target close\n")


def prepare_tree(dst):
    """Copies about --ext4-tree bytes of /usr/lib (then /usr/share) into dst, as cp -a would."""
    budget = ARGS.ext4_tree
    entries, total, files = [], 0, 0
    for top in ("/usr/lib", "/usr/share"):
        for root, dirs, names in os.walk(top):
            dirs.sort()
            if root.startswith(str(WORK)):
                continue
            entries.append(root)
            for name in sorted(names):
                p = os.path.join(root, name)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                entries.append(p)
                if os.path.isfile(p) and not os.path.islink(p):
                    total += st.st_size
                    files += 1
                if total >= budget:
                    break
            if total >= budget:
                break
        if total >= budget:
            break
    dst.mkdir(parents=True)
    lst = dst.parent / "tree.list"
    lst.write_text("\n".join(e.lstrip("/") for e in entries) + "\n")
    subprocess.run(f"tar -C / --no-recursion -cf - -T {lst} | tar -C {dst} -xf -",
                   shell=True, check=True, timeout=1800, stderr=subprocess.DEVNULL)
    log(f"ext4 source tree: {files} files, {total / MIB:.0f} MiB")
    return total, files


def warm_tree(tree):
    for root, _, names in os.walk(tree):
        for name in names:
            p = os.path.join(root, name)
            if os.path.isfile(p) and not os.path.islink(p):
                try:
                    with open(p, "rb") as f:
                        while f.read(MIB):
                            pass
                except OSError:
                    pass


# ---------------------------------------------------------------------------------------------
# fio

def fio_argv(job, target, src):
    a = ["fio", f"--name={job}", "--direct=1", "--ioengine=io_uring", "--output-format=json",
         "--group_reporting=1", "--randrepeat=1", "--allow_file_create=0", "--fallocate=none",
         "--lat_percentiles=1"]
    rt = [f"--runtime={ARGS.runtime}", "--time_based=1"]
    whole = [f"--filename={target}", f"--size={ARGS.disk_size}"]
    if fio_numjobs(job) > 1:
        # every fio job reads the whole disk at its own random offsets (own seed per job)
        depth = re.fullmatch(r"randread-qd(\d+)-\d+j", job).group(1)
        return a + whole + rt + ["--rw=randread", "--bs=4k", f"--iodepth={depth}",
                                 f"--numjobs={fio_numjobs(job)}"]
    if job == "randread-qd1":
        return a + whole + rt + ["--rw=randread", "--bs=4k", "--iodepth=1"]
    if job == "randread-qd32":
        return a + whole + rt + ["--rw=randread", "--bs=4k", "--iodepth=32"]
    if job == "seqread":
        return a + whole + rt + ["--rw=read", "--bs=1M", "--iodepth=8"]
    if job == "randwrite-alloc":
        return a + [f"--filename={target}", "--offset=0", f"--size={ARGS.prefill}"] + rt + [
            "--rw=randwrite", "--bs=4k", "--iodepth=32"]
    if job == "seqwrite":
        return a + whole + rt + ["--rw=write", "--bs=1M", "--iodepth=8"]
    if job == "randwrite-cow":
        # one pass over the clusters; stops at --runtime if it is not done by then
        return a + [f"--read_iolog={src / 'cow.iolog'}", f"--replay_redirect={target}",
                    "--replay_no_stall=1", "--iodepth=32", f"--runtime={ARGS.runtime}"]
    raise ValueError(job)


def run_fio(job, target, src, on_timeout=None):
    argv = fio_argv(job, target, src)
    p = run(argv, timeout=ARGS.runtime + ARGS.grace, check=False, on_timeout=on_timeout)
    out = p.stdout
    start = out.find("{")
    try:
        data = json.loads(out[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        data = None
    if p.returncode != 0 or data is None:
        raise StepError(f"fio {job} exited {p.returncode}: {(p.stderr or out).strip()[-600:]}")
    j = data["jobs"][0]
    if j.get("error"):
        raise StepError(f"fio {job}: error {j['error']}: {(p.stderr or '').strip()[-400:]}")
    side = j["write"] if job in WRITE_JOBS else j["read"]
    if side["total_ios"] == 0:
        raise StepError(f"fio {job}: no I/O completed")
    lat = side.get("lat_ns", {})  # submission to completion (clat alone misses inline issue)
    p99 = lat.get("percentile", {}).get("99.000000")
    return {"iops": side["iops"], "bw": side["bw_bytes"], "ios": side["total_ios"],
            "runtime_ms": j.get("job_runtime"), "lat_mean_us": lat.get("mean", 0) / 1000,
            "lat_p99_us": (p99 or 0) / 1000}


def fio_numjobs(job):
    m = re.fullmatch(r"randread-qd\d+-(\d+)j", job)
    return int(m.group(1)) if m else 1


def fio_value(job, r):
    return r["iops"] if JOB_UNIT[job] == "IOPS" else r["bw"] / MIB


# ---------------------------------------------------------------------------------------------
# The benchmark

class Results:
    def __init__(self):
        self.values = {}   # (job, contender) -> [value per round]
        self.extra = {}    # (job, contender) -> [text per round]
        self.stats = {}    # (job, daemon) -> [(peak_kib, cpu_s)]
        self.na = {}       # (job, contender) -> reason
        self.by_round = {}  # (job, contender) -> {round: value}
        self.osd_cpu = {}  # (job, contender) -> [CPU seconds of the Ceph OSD during the job]
        self.round = 0     # the round being run

    def add(self, job, who, value, extra=None, stat=None, osd=None):
        self.values.setdefault((job, who), []).append(value)
        self.by_round.setdefault((job, who), {})[self.round] = value
        if extra:
            self.extra.setdefault((job, who), []).append(extra)
        if stat:
            self.stats.setdefault((job, who), []).append(stat)
        if osd:
            self.osd_cpu.setdefault((job, who), []).append(osd[1])


R = Results()


def fio_round(key, rnd, src):
    jobs = [j for j in FIO_JOBS if j in ARGS.jobs]
    c = CLASSES[key]()
    if c.reads_only:
        for j in jobs:
            if j in WRITE_JOBS:
                R.na[(j, key)] = "read-only"
        jobs = [j for j in jobs if j not in WRITE_JOBS]
    if c.only_jobs is not None:
        for j in jobs:
            if j not in c.only_jobs:
                R.na[(j, key)] = c.only_reason
        jobs = [j for j in jobs if j in c.only_jobs]
    if not jobs:
        return
    d = WORK / "run" / f"r{rnd}-{key}"
    d.mkdir(parents=True)
    try:
        log(f"round {rnd}: {key}: setting up")
        c.start(d, src)
        if key != "null":
            c.check_content()
        for job in jobs:
            try:
                if job == "randwrite-cow":
                    c.new_overlay()
                c.check_alive()
                drop_caches()
                with Meter(c.pid()) as m, Meter(c.osd_pid(), rss=False) as osd:
                    r = run_fio(job, c.target, src, on_timeout=c.abort)
                c.check_alive()
                v = fio_value(job, r)
                R.add(job, key, v, extra=r, stat=m.result(), osd=osd.result())
                log(f"round {rnd}: {key}: {job}: {v:.0f} {JOB_UNIT[job]}")
            except StepError as e:
                problem(key, f"round {rnd} {job}: {e}")
                if "timed out" in str(e) or (c.daemon is not None and not c.daemon.alive()):
                    break
    except StepError as e:
        problem(key, f"round {rnd}: {e}")
    finally:
        c.stop()
        shutil.rmtree(d, ignore_errors=True)


def commit_round(rnd, src, imgfs_first=True):
    steps = [commit_imgfs, commit_qemu_img]
    for step in (steps if imgfs_first else reversed(steps)):
        step(rnd, src)


def commit_imgfs(rnd, src):
    # imgfs: online commit through the control file, timed until the job is concluded
    d = WORK / "run" / f"r{rnd}-commit-imgfs"
    d.mkdir(parents=True)
    c = Imgfs()
    try:
        log(f"round {rnd}: commit: imgfs")
        c.start(d, src, overlay="cdisk.qcow2")
        drop_caches()
        with Meter(c.pid()) as m:
            t0 = time.monotonic()
            c.control("commit", "\n")
            state = {}

            def done():
                nonlocal state
                state = c.job_state() or {}
                return state.get("state") == "concluded" or bool(state.get("error"))

            try:
                wait_until(done, ARGS.commit_timeout, "the imgfs commit job to conclude", c.daemon)
            except StepError:
                c.abort()
                raise
            t1 = time.monotonic()
            run(["sync"], timeout=600, on_timeout=c.abort)
            t2 = time.monotonic()
        if state.get("error"):
            raise StepError(f"commit job failed: {state['error']}")
        if state.get("done_bytes") != state.get("total_bytes"):
            problem("imgfs", f"round {rnd} commit: done_bytes {state.get('done_bytes')} != "
                    f"total_bytes {state.get('total_bytes')}")
        R.add("commit", "imgfs", t1 - t0, extra={"with_sync_s": t2 - t0}, stat=m.result())
        log(f"round {rnd}: commit: imgfs {t1 - t0:.2f} s (+sync {t2 - t0:.2f} s)")
    except StepError as e:
        problem("imgfs", f"round {rnd} commit: {e}")
    finally:
        c.stop()
        shutil.rmtree(d, ignore_errors=True)


def commit_qemu_img(rnd, src):
    # qemu-img commit, offline, on an identical copy (reported in the qsd column)
    d = WORK / "run" / f"r{rnd}-commit-qemu-img"
    d.mkdir(parents=True)
    try:
        log(f"round {rnd}: commit: qemu-img")
        img = copy_chain(src, d, "cdisk.qcow2")
        drop_caches()
        t0 = time.monotonic()
        elapsed, peak, cpu = run_rusage(["qemu-img", "commit", "-q", img / "cdisk.qcow2"],
                                        timeout=ARGS.commit_timeout)
        run(["sync"], timeout=600)
        t2 = time.monotonic()
        R.add("commit", "qsd", elapsed, extra={"with_sync_s": t2 - t0}, stat=(peak, cpu))
        log(f"round {rnd}: commit: qemu-img {elapsed:.2f} s (+sync {t2 - t0:.2f} s)")
    except StepError as e:
        problem("qsd", f"round {rnd} commit (qemu-img commit): {e}")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def ext4_round(key, rnd, src, tree):
    d = WORK / "run" / f"r{rnd}-ext4-{key}"
    d.mkdir(parents=True)
    c = CLASSES[key]()
    fs = d / "fs"
    fs.mkdir()
    loop = None
    try:
        log(f"round {rnd}: ext4: {key}")
        c.start(d, src)
        drop_caches()
        warm_tree(tree)
        loop = run(["losetup", "-f", "--show", c.target], timeout=60).stdout.strip()
        LOOPS.add(loop)
        with Meter(c.pid()) as m:
            t0 = time.monotonic()
            run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
                 loop], timeout=ARGS.ext4_timeout, on_timeout=c.abort)
            run(["mount", loop, fs], timeout=120, on_timeout=c.abort)
            t1 = time.monotonic()
            run(["cp", "-a", f"{tree}/.", f"{fs}/"], timeout=ARGS.ext4_timeout, on_timeout=c.abort)
            run(["sync"], timeout=ARGS.ext4_timeout, on_timeout=c.abort)
            t2 = time.monotonic()
        c.check_alive()
        R.add("ext4", key, t2 - t1, extra={"mkfs_s": t1 - t0}, stat=m.result())
        log(f"round {rnd}: ext4: {key}: mkfs {t1 - t0:.2f} s, cp -a + sync {t2 - t1:.2f} s")
    except StepError as e:
        problem(key, f"round {rnd} ext4: {e}")
    finally:
        if is_mounted(fs):
            force_unmount(fs, fuse=False)
        if loop:
            detach_loop(loop)
        c.stop()
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Report

def fmt_val(job, v):
    if v is None:
        return "n/a"
    if JOB_UNIT[job] == "s":
        return f"{v:.2f}"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def median(xs):
    return statistics.median(xs) if xs else None


def cell(job, who):
    vals = R.values.get((job, who))
    if vals:
        s = fmt_val(job, median(vals))
        if len(vals) < ARGS.rounds:
            s += f" ({len(vals)}/{ARGS.rounds} rounds)"
        return s
    if (job, who) in R.na:
        return "n/a"
    if job == "commit" and who not in ("imgfs", "qsd"):
        return "n/a"
    if job == "ext4" and who not in ("imgfs", "qsd", "raw"):
        return "n/a"
    if who not in ARGS.contenders and not (job == "commit" and who == "qsd"):
        return "not run"
    return "n/a (failed)"


def ratio_value(job, other="qsd", mine="imgfs", other_job=None):
    """Median over the rounds of mine/other (other/mine for times): >1 means `mine` is faster.
    other_job compares two jobs of one contender (e.g. 2 fio jobs against 1). Only rounds in
    which both have a value count."""
    a = R.by_round.get((job, mine), {})
    b = R.by_round.get((other_job or job, other), {})
    rs = [(b[r] / a[r] if job in LOWER_IS_BETTER else a[r] / b[r])
          for r in sorted(set(a) & set(b)) if a[r] and b[r]]
    return median(rs)


def ratio(job, other="qsd", mine="imgfs"):
    r = ratio_value(job, other, mine)
    return "n/a" if r is None else f"{r:.2f}"


# Ratio columns of the results table: (mine, other, heading), shown when both ran.
RATIO_COLUMNS = [
    ("imgfs", "qsd", "imgfs/qsd (>1: imgfs faster)"),
    ("imgfs-devfuse", "qsd", "imgfs uring=off/qsd"),
    ("imgfs", "imgfs-devfuse", "imgfs default/uring=off"),
    ("imgfs-tmpfs", "null", "transport: imgfs tmpfs/null FUSE"),
    ("imgfs-tmpfs", "imgfs-tmpfs-devfuse", "transport: default/uring=off"),
    ("imgfs-2loops", "imgfs", "imgfs threads=2/default"),
    ("imgfs-tmpfs-2loops", "imgfs-tmpfs", "transport: threads=2/default"),
    ("imgfs-rbd", "qsd-rbd", "rbd: imgfs/qsd"),
    ("rbd-fuse", "qsd-rbd", "rbd: rbd-fuse/qsd"),
    ("imgfs-rbd", "rbd-fuse", "rbd: imgfs/rbd-fuse"),
    ("imgfs-rbd-raw", "rbd-fuse", "rbd, raw image: imgfs/rbd-fuse"),
]

# Targets of issues 7 and 15: (what, job, mine, compared with, its job, at least)
TARGETS = [
    ("4k randread qd1 vs qemu-storage-daemon", "randread-qd1", "imgfs", "qsd", None, 1.5),
    ("4k randread qd32 vs qemu-storage-daemon", "randread-qd32", "imgfs", "qsd", None, 2.0),
    ("4k randwrite qd32, allocated clusters vs qemu-storage-daemon", "randwrite-alloc", "imgfs",
     "qsd", None, 2.0),
    ("4k randwrite qd32, fresh overlay (COW) vs qemu-storage-daemon", "randwrite-cow", "imgfs",
     "qsd", None, 1.5),
    ("1M seq read vs qemu-storage-daemon", "seqread", "imgfs", "qsd", None, 1.3),
    ("1M seq write vs qemu-storage-daemon", "seqwrite", "imgfs", "qsd", None, 1.3),
    ("commit vs `qemu-img commit`", "commit", "imgfs", "qsd", None, 1.0),
    ("transport alone (raw on tmpfs), 4k randread qd32 vs the null-FUSE ceiling", "randread-qd32",
     "imgfs-tmpfs", "null", None, 1.3),
    ("transport alone, 4k randread qd32: 2 fio jobs vs 1", "randread-qd32-2j", "imgfs-tmpfs",
     "imgfs-tmpfs", "randread-qd32", 1.6),
    ("rbd: 4k randread qd32 vs qemu-storage-daemon (rbd driver)", "randread-qd32", "imgfs-rbd",
     "qsd-rbd", None, 1.5),
    ("rbd: 4k randwrite qd32, allocated clusters vs qemu-storage-daemon", "randwrite-alloc",
     "imgfs-rbd", "qsd-rbd", None, 1.5),
    ("rbd: 1M seq read vs qemu-storage-daemon", "seqread", "imgfs-rbd", "qsd-rbd", None, 1.0),
    ("rbd: 1M seq write vs qemu-storage-daemon", "seqwrite", "imgfs-rbd", "qsd-rbd", None, 1.0),
] + [(f"rbd: {JOB_LABEL[j]} vs rbd-fuse", j, "imgfs-rbd", "rbd-fuse", None, 3.0)
     for j in RBD_JOBS]
RSS_TARGET_MIB = 64


def target_lines():
    L = ["| target | ratio (median of per-round ratios) | needed | result |",
         "|---|---:|---:|---|"]
    for what, job, mine, other, other_job, need in TARGETS:
        if job not in ARGS.jobs or (other_job and other_job not in ARGS.jobs):
            continue
        if mine not in ARGS.contenders or (other not in ARGS.contenders and job != "commit"):
            continue
        r = ratio_value(job, other, mine, other_job)
        verdict = "n/a" if r is None else ("met" if r >= need else "missed")
        L.append(f"| {what} | {'n/a' if r is None else f'{r:.2f}'} | {need:.1f} | {verdict} |")
    peaks = [(s[0], job) for (job, who), st in R.stats.items() if who in IMGFS_KEYS for s in st]
    if peaks:
        peak, job = max(peaks)
        verdict = "met" if peak / 1024 <= RSS_TARGET_MIB else "missed"
        L.append(f"| imgfs peak RSS under load (highest of all jobs and rounds: {job}) | "
                 f"{peak / 1024:.1f} MiB | at most {RSS_TARGET_MIB} MiB | {verdict} |")
    return L


def machine():
    def out(argv):
        try:
            return run(argv, timeout=30, check=False).stdout.strip()
        except StepError:
            return "?"
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / (1024 * 1024):.1f} GiB"
    except OSError:
        pass
    qcowv = out(["qcowmount", "-V"]).splitlines() if shutil.which("qcowmount") else []
    ceph = []
    if any(c in RBD_CONTENDERS for c in ARGS.contenders):
        cephv = out(["ceph-osd", "--version"]) if shutil.which("ceph-osd") else "not installed"
        fusev = "installed" if shutil.which("rbd-fuse") else "not installed"
        ceph = [f"- ceph: {cephv}; rbd-fuse: {fusev}"]
    fsinfo = out(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(WORK)])
    rev = out(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    return [
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- host: {platform.node()}, {os.cpu_count()} CPUs (nproc {out(['nproc'])}), {cpu}, "
        f"{mem} RAM",
        f"- kernel: {platform.release()} ({platform.version()})",
        f"- work directory: {WORK} on {fsinfo}",
        f"- fio: {out(['fio', '--version'])}; qemu: {out(['qemu-img', '--version']).splitlines()[0]}"
        f"; qemu-storage-daemon: {out(['qemu-storage-daemon', '--version']).splitlines()[0]}",
        f"- qcowmount: {qcowv[0] if qcowv else 'not installed'}; imgfs: {IMGFS} (git {rev})",
    ] + ceph


def report(elapsed_s, machine_lines):
    L = []
    rbd_run = any(c in RBD_CONTENDERS for c in ARGS.contenders)
    if ARGS.suite == "rbd":
        L.append("# imgfs benchmark on a Ceph pool: imgfs vs qemu-storage-daemon (rbd driver) vs "
                 "rbd-fuse")
    else:
        L.append("# imgfs benchmark: imgfs vs qemu-storage-daemon (FUSE export) vs qcowmount")
    L.append("")
    L += machine_lines
    L.append(f"- settings: {ARGS.rounds} round(s), {ARGS.runtime} s per fio job, disk "
             f"{human(ARGS.disk_size)} (qcow2 base filled with data + qcow2 overlay holding the "
             f"first {human(ARGS.prefill)}), caches "
             f"{'kept' if ARGS.no_drop_caches else 'dropped before every job'}"
             f"{', quick mode' if ARGS.quick else ''}")
    if rbd_run:
        L.append(f"- Ceph: one throwaway cluster for the run (`tests/ceph/cluster.sh`: one "
                 f"monitor, one OSD with memstore, i.e. its objects in RAM, of "
                 f"{ARGS.osd_mib} MiB, pool `{RBD_POOL}` of size 1, no authentication, "
                 f"loopback), {'port ' + str(CEPH['port']) if 'port' in CEPH else 'not started'}"
                 "; each contender's images live in their own RBD namespace, imported per round "
                 "and removed after it")
    L.append(f"- total run time: {elapsed_s / 60:.1f} min; load average (1 min) at the start "
             f"{LOAD[0]}, at the end {LOAD[1]}, highest seen between jobs {LOAD[2]}"
             " (other work on the host makes the ratios noisy: compare rounds below)")
    L.append("- order: the contenders take turns in every round ("
             + ", ".join(c for c in CONTENDERS if c in ARGS.contenders)
             + "), reversed in even rounds; each gets its own copy of the chain per round")
    L.append("")
    cols = [c for c in CONTENDERS if c in ARGS.contenders]
    rcols = [(m, o, h) for m, o, h in RATIO_COLUMNS
             if m in ARGS.contenders and o in ARGS.contenders]
    if "imgfs" in ARGS.contenders and "commit" in ARGS.jobs and not any(
            m == "imgfs" and o == "qsd" for m, o, _ in rcols):
        rcols.insert(0, RATIO_COLUMNS[0])
    L.append(f"## Results (median of {ARGS.rounds} round(s))")
    L.append("")
    L.append("| job | unit | " + " | ".join(CONTENDER_LABEL[c] for c in cols)
             + "".join(f" | {h}" for _, _, h in rcols) + " |")
    L.append("|---|---|" + "---:|" * (len(cols) + len(rcols)))
    # The ratio column is the median of the per-round ratios, which can differ a little from
    # the ratio of the medians shown beside it.
    for job in ARGS.jobs:
        label = JOB_LABEL[job].format(commit=human(ARGS.commit_size),
                                      tree=f"{ARGS.tree_bytes / MIB:.0f} MiB" if ARGS.tree_bytes
                                      else human(ARGS.ext4_tree))
        unit = JOB_UNIT[job] + (" (lower is better)" if job in LOWER_IS_BETTER else "")
        L.append(f"| {label} | {unit} | " + " | ".join(cell(job, c) for c in cols)
                 + "".join(f" | {ratio(job, o, m)}" for m, o, _ in rcols) + " |")
    L.append("")
    notes = [
        "fio: `--direct=1 --ioengine=io_uring`; 4k random jobs over the whole disk except "
        f"'allocated clusters' (the overlay's pre-filled first {human(ARGS.prefill)})"
        + ("; 'fresh overlay' writes one 4 KiB block into every 64 KiB cluster of an empty overlay "
           "over the data-filled chain, in random order (each write copies on write from the "
           "backing): imgfs takes the overlay as a live snapshot through its control file, "
           "qemu-storage-daemon is restarted on an overlay made with `qemu-img create -b`."
           if "randwrite-cow" in ARGS.jobs else "."),
    ]
    if any(c not in RBD_CONTENDERS for c in ARGS.contenders):
        notes.append(
            "qemu-storage-daemon: `driver=file,aio=io_uring,cache.direct=off` + `driver=qcow2`, "
            "FUSE export `writable=on`; imgfs: "
            + (f"`-o {ARGS.imgfs_options}`" if ARGS.imgfs_options
               else "default mount options (buffered writes; reads from the page cache "
                    "where it holds them, otherwise O_DIRECT)")
            + ". The raw-file "
            "ceiling is fio with O_DIRECT on a raw copy of the disk on the host filesystem.")
    if rbd_run:
        notes.append(
            "rbd contenders: the same chain imported byte for byte with `rbd import` (the "
            f"overlay's backing name rewritten to `rbd:{RBD_POOL}/NS/base.qcow2` by "
            f"`qemu-img rebase -u`). imgfs-rbd: `imgfs mount rbd:{RBD_POOL}/NS MNT -o "
            "ceph_conf=CONF" + (f",{ARGS.imgfs_options}" if ARGS.imgfs_options else "")
            + "`, fio on `MNT/disk.raw`; qsd-rbd: `driver=rbd,namespace=NS,image=...,"
            "cache.direct=off` + `driver=qcow2` per image, the overlay with `backing=` the base's "
            "qcow2 node, FUSE export `writable=on`; rbd-fuse: `rbd-fuse -p "
            f"{RBD_POOL} -s NS MNT` serving a raw RBD image holding the chain flattened "
            "(`qemu-img convert -O raw`). qsd-rbd and rbd-fuse go through librbd with its "
            "default cache (on), imgfs with librbd's cache off (it acknowledges writes the "
            "cluster may still drop); the page-cache drop before each job does not reach it.")
    if "commit" in ARGS.jobs:
        notes.append(f"commit: a {human(ARGS.commit_size)} overlay over the {human(ARGS.disk_size)}"
                     " base; imgfs: online commit through `.control/NAME/commit`, time until the "
                     "job is `concluded`; the qemu-storage-daemon column holds offline "
                     "`qemu-img commit` on an identical copy.")
    if "ext4" in ARGS.jobs:
        notes.append("ext4: `losetup` on the export file, `mkfs.ext4 -E nodiscard,"
                     "lazy_itable_init=0,lazy_journal_init=0`, mount, then timed: `cp -a` of a "
                     "source tree (from /usr/lib, page-cache warm) and `sync`.")
    L += [f"- {n}" for n in notes]
    L.append("")
    if TRANSPORTS:
        L.append("- transports the imgfs mounts reported (`info.transport`): "
                 + "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in sorted(TRANSPORTS.items()))
                 + f"; /sys/module/fuse/parameters/enable_uring = {enable_uring()}")
        L.append("")
    L.append("## Targets (Ceph pool)" if ARGS.suite == "rbd" else "## Targets (issues 7 and 15)")
    L.append("")
    L += target_lines()
    L.append("")

    L.append("## Daemons: peak RSS (MiB) / CPU seconds per job (median)")
    L.append("")
    daemons = [d for d in DAEMONS if d in ARGS.contenders]
    L.append("| job | " + " | ".join(CONTENDER_LABEL[d] for d in daemons) + " |")
    L.append("|---|" + "---:|" * len(daemons))
    for job in ARGS.jobs:
        row = []
        for dmn in daemons:
            st = R.stats.get((job, dmn))
            if st:
                row.append(f"{median([s[0] for s in st]) / 1024:.1f} / "
                           f"{median([s[1] for s in st]):.2f}")
            else:
                row.append("n/a")
        L.append(f"| {job} | " + " | ".join(row) + " |")
    L.append("")
    L.append("Peak RSS is VmHWM of the daemon, reset at the start of each job (clear_refs) and "
             "sampled during it; CPU is utime+stime over the job. For commit, the "
             "qemu-storage-daemon column is the `qemu-img commit` process.")
    L.append("")
    if R.osd_cpu:
        osd_cols = [c for c in RBD_CONTENDERS if c in ARGS.contenders]
        L.append("## Ceph OSD: CPU seconds per job while serving each contender (median)")
        L.append("")
        L.append("| job | " + " | ".join(CONTENDER_LABEL[c] for c in osd_cols) + " |")
        L.append("|---|" + "---:|" * len(osd_cols))
        for job in ARGS.jobs:
            if not any((job, c) in R.osd_cpu for c in osd_cols):
                continue
            L.append(f"| {job} | " + " | ".join(
                f"{median(R.osd_cpu[(job, c)]):.2f}" if (job, c) in R.osd_cpu else "n/a"
                for c in osd_cols) + " |")
        L.append("")
        L.append("The one OSD shares the host's CPUs with the FUSE daemon and fio: its CPU time "
                 "is part of what each contender costs.")
        L.append("")

    L.append("## Per-round values")
    L.append("")
    L.append("| job | contender | values | details (median) |")
    L.append("|---|---|---|---|")
    for job in ARGS.jobs:
        for c in CONTENDERS:
            vals = R.values.get((job, c))
            if not vals:
                continue
            ex = R.extra.get((job, c), [])
            det = ""
            if job in FIO_JOBS and ex:
                det = (f"latency mean {median([e['lat_mean_us'] for e in ex]):.0f} µs, "
                       f"p99 {median([e['lat_p99_us'] for e in ex]):.0f} µs, "
                       f"{median([e['bw'] for e in ex]) / MIB:.1f} MiB/s, "
                       f"{median([e['ios'] for e in ex]):.0f} I/Os in "
                       f"{median([e['runtime_ms'] for e in ex]) / 1000 / fio_numjobs(job):.1f} s"
                       + (f" ({fio_numjobs(job)} fio jobs)" if fio_numjobs(job) > 1 else ""))
            elif job == "commit" and ex:
                det = f"with sync {median([e['with_sync_s'] for e in ex]):.2f} s"
            elif job == "ext4" and ex:
                det = f"mkfs {median([e['mkfs_s'] for e in ex]):.2f} s"
            L.append(f"| {job} | {c} | " + ", ".join(fmt_val(job, v) for v in vals)
                     + f" | {det} |")
    L.append("")
    L.append("## Problems")
    L.append("")
    if PROBLEMS:
        for who, text in PROBLEMS:
            L.append(f"- {who}: {text}")
    else:
        L.append("- none")
    L.append("")
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, help="rounds (default 3; 1 with --quick)")
    ap.add_argument("--runtime", type=int, help="seconds per fio job (default 10; 5 with --quick)")
    ap.add_argument("--jobs",
                    help=f"comma separated subset of: {','.join(ALL_JOBS)}")
    ap.add_argument("--contenders",
                    help=f"comma separated subset of: {','.join(CONTENDERS)} (default: "
                    f"{','.join(DEFAULT_CONTENDERS)}; with --suite transport: "
                    f"{','.join(TRANSPORT_CONTENDERS)}; with --suite rbd: "
                    f"{','.join(RBD_CONTENDERS)})")
    ap.add_argument("--suite", choices=["table", "transport", "rbd"], default="table",
                    help="table (default): the job table of docs/benchmarks.md; transport: 4k "
                    "random reads with 1, 2 and 4 fio jobs, imgfs with and without FUSE over "
                    "io_uring, and the transport alone (a raw image on tmpfs); rbd: the chain in "
                    "a Ceph pool (a throwaway memstore cluster), imgfs against "
                    "qemu-storage-daemon's rbd driver and rbd-fuse, jobs "
                    f"{','.join(RBD_JOBS)}, disk 1G by default. run.sh --suite guest runs "
                    "guest.py instead: a QEMU guest on NAME.raw against QEMU opening the chain "
                    "(guest.py --help lists its options)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 1 round, 5 s per job, 512 MiB disk, smaller commit and tree")
    ap.add_argument("--out", default=str(HERE / "results.md"), help="markdown report file")
    ap.add_argument("--workdir", help="parent of the scratch directory (default /var/tmp); "
                    "needs about 4x the disk size free, plus the commit chain")
    ap.add_argument("--disk-size", type=parse_size,
                    help="virtual disk size (default 2G; 1G with --suite rbd)")
    ap.add_argument("--prefill", type=parse_size,
                    help="overlay data at the start (default 512M; half the disk with --suite rbd)")
    ap.add_argument("--commit-size", type=parse_size, help="overlay data to commit (default 1G)")
    ap.add_argument("--ext4-tree", type=parse_size, help="size of the copied tree (default 500M)")
    ap.add_argument("--imgfs", help="imgfs binary (default build-rel/imgfs)")
    ap.add_argument("--imgfs-options", default="",
                    help="mount options for imgfs (-o), e.g. direct; default: none")
    ap.add_argument("--no-drop-caches", action="store_true",
                    help="do not sync and drop the page cache before every job")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--step-timeout", type=int, default=900,
                    help="time limit in seconds of a commit, an ext4 step, a copy (default 900)")
    ap.add_argument("--grace", type=int, default=120,
                    help="seconds a fio job may run past --runtime before it counts as hung")
    ap.add_argument("--osd-mib", type=int,
                    help="rbd contenders: capacity of the memstore OSD in MiB (default 6x the "
                    "disk size, at least 4096); it holds its objects in RAM, about twice the "
                    "bytes stored, and a full OSD blocks writes for good")
    a = ap.parse_args(argv)
    q = a.quick
    a.rounds = a.rounds or (1 if q else 3)
    a.runtime = a.runtime or (5 if q else 10)
    rbd_suite = a.suite == "rbd"
    a.disk_size = a.disk_size or (512 * MIB if q else (GIB if rbd_suite else 2 * GIB))
    if rbd_suite:  # the overlay holds half the disk; no commit job in this suite
        a.prefill = a.prefill or a.disk_size // 2 // CLUSTER * CLUSTER
        a.commit_size = a.commit_size or min(GIB, a.disk_size)
    a.prefill = a.prefill or (128 * MIB if q else 512 * MIB)
    a.commit_size = a.commit_size or (256 * MIB if q else GIB)
    a.ext4_tree = a.ext4_tree or (100 * MIB if q else 500 * MIB)
    a.commit_timeout = a.step_timeout
    a.ext4_timeout = a.step_timeout
    a.tree_bytes = None
    transport = a.suite == "transport"
    a.jobs = a.jobs or ",".join(TRANSPORT_JOBS if transport else RBD_JOBS if rbd_suite
                                else FIO_JOBS[:6] + OTHER_JOBS)
    a.contenders = a.contenders or ",".join(TRANSPORT_CONTENDERS if transport
                                            else RBD_CONTENDERS if rbd_suite
                                            else DEFAULT_CONTENDERS)
    # One contender's chain at a time (base full, overlay full after seqwrite: 2x the disk)
    # is what the OSD holds at most; its capacity costs nothing until written.
    a.osd_mib = a.osd_mib or max(4096, 6 * a.disk_size // MIB)
    a.jobs = [j.strip() for j in a.jobs.split(",") if j.strip()]
    bad = [j for j in a.jobs if j not in ALL_JOBS]
    if bad:
        ap.error(f"unknown job(s) {','.join(bad)}; known: {','.join(ALL_JOBS)}")
    a.jobs = [j for j in ALL_JOBS if j in a.jobs]
    a.contenders = [c.strip() for c in a.contenders.split(",") if c.strip()]
    bad = [c for c in a.contenders if c not in CONTENDERS]
    if bad:
        ap.error(f"unknown contender(s) {','.join(bad)}; known: {','.join(CONTENDERS)}")
    if a.rounds < 1 or a.runtime < 1:
        ap.error("--rounds and --runtime must be at least 1")
    for name in ("disk_size", "prefill", "commit_size"):
        if getattr(a, name) % CLUSTER:
            ap.error(f"--{name.replace('_', '-')} must be a multiple of 64K")
    if a.prefill > a.disk_size or a.commit_size > a.disk_size:
        ap.error("--prefill and --commit-size must not exceed --disk-size")
    if a.osd_mib < 3 * a.disk_size // MIB:
        ap.error("--osd-mib must be at least 3x the disk size (a chain takes up to 2x)")
    return a


def preflight():
    if os.geteuid() != 0:
        sys.exit("bench.py: must run as root (FUSE mounts, loop devices, drop_caches)")
    for tool in ("fio", "qemu-img", "qemu-io", "qemu-storage-daemon", "mkfs.ext4", "losetup",
                 "fusermount3"):
        if shutil.which(tool) is None:
            sys.exit(f"bench.py: {tool} not found (run tests/bench/run.sh, which installs it)")
    if not os.access(IMGFS, os.X_OK):
        sys.exit(f"bench.py: {IMGFS} not found (run tests/bench/run.sh, which builds it)")
    if any(c in RBD_CONTENDERS for c in ARGS.contenders):
        # rbd-fuse is checked by its contender (n/a if missing), like qcowmount
        for tool in ("ceph-mon", "ceph-osd", "monmaptool", "ceph", "rados", "rbd"):
            if shutil.which(tool) is None:
                sys.exit(f"bench.py: {tool} not found (the rbd contenders need ceph-mon, "
                         "ceph-osd and ceph-common: run tests/bench/run.sh --suite rbd)")
    if not Path("/dev/loop-control").exists():
        subprocess.run(["modprobe", "loop"], check=False)
    if not Path("/dev/fuse").exists():
        subprocess.run(["modprobe", "fuse"], check=False)


def main(argv):
    global ARGS, WORK, LOGDIR, IMGFS
    ARGS = parse_args(argv)
    IMGFS = Path(ARGS.imgfs).resolve() if ARGS.imgfs else ROOT / "build-rel" / "imgfs"
    preflight()
    parent = Path(ARGS.workdir or "/var/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    WORK = Path(tempfile.mkdtemp(prefix="imgfs-bench.", dir=parent)).resolve()
    LOGDIR = WORK / "logs"
    LOGDIR.mkdir()
    atexit.register(cleanup_all)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    t_start = time.monotonic()
    log(f"scratch directory {WORK}; jobs {','.join(ARGS.jobs)}; contenders "
        f"{','.join(ARGS.contenders)}; {ARGS.rounds} round(s) of {ARGS.runtime} s per fio job")
    interrupted = False
    machine_lines = machine()
    LOAD[0] = loadavg()
    try:
        src = WORK / "src"
        prepare_sources(src)
        if any(c in RBD_CONTENDERS for c in ARGS.contenders):
            start_ceph()
        tree = None
        if "ext4" in ARGS.jobs:
            ARGS.tree_bytes, _ = prepare_tree(WORK / "tree")
            tree = WORK / "tree"
        fio_contenders = [c for c in CONTENDERS if c in ARGS.contenders]
        for rnd in range(1, ARGS.rounds + 1):
            R.round = rnd
            # A B C, then C B A, ...: a drift in machine load (other work on the host, the
            # page cache, the disk) favours no contender systematically.
            order = (lambda xs: xs) if rnd % 2 else (lambda xs: list(reversed(xs)))
            if any(j in ARGS.jobs for j in FIO_JOBS):
                for key in order(fio_contenders):
                    fio_round(key, rnd, src)
            if "commit" in ARGS.jobs:
                commit_round(rnd, src, imgfs_first=rnd % 2 == 1)
            if "ext4" in ARGS.jobs:
                for key in order(["imgfs", "qsd", "raw"]):
                    if key in ARGS.contenders:
                        ext4_round(key, rnd, src, tree)
    except KeyboardInterrupt as e:
        interrupted = True
        problem("bench", f"interrupted ({e or 'Ctrl-C'}); results are partial")
    except StepError as e:
        problem("bench", f"setup failed: {e}")
    finally:
        LOAD[1] = loadavg()
        log("cleaning up")
        cleanup_all()
    text = report(time.monotonic() - t_start, machine_lines)
    print(text)
    try:
        Path(ARGS.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ARGS.out).write_text(text)
        log(f"report written to {ARGS.out}")
    except OSError as e:
        log(f"could not write {ARGS.out}: {e}")
    leftovers = [mp for mp, _, _ in mounts() if mp.startswith(str(WORK))] + loops_under(WORK)
    if leftovers:
        log(f"WARNING: left behind: {leftovers}")
        return 2
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
