"""A throwaway QEMU guest (TCG) whose virtio disk runs guest_io jobs, for the guest benchmark
(tests/bench/guest.py) and the guest integration test (tests/integration/test_guest.py).

The guest is Debian's kernel (the package linux-image-amd64 points at, fetched once with
`apt-get download` into a cache directory) and an initramfs holding busybox, guest_io (built
static from guest_io.cc) and the virtio modules. Its init loads the modules, runs the jobs named
on the kernel command line against /dev/vda, prints guest_io's RESULT/ERROR lines on the serial
console, then powers off at once (no clean shutdown: what the disk holds is what was written).
"""

import queue
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = Path("/var/tmp/imgfs-guest-kernel")
# virtio_blk and its PCI transport; modinfo gives what they depend on.
GUEST_MODULES = ["virtio_pci", "virtio_blk"]

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do insmod /modules/$m || echo "ERROR insmod $m"; done
for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done
[ -b /dev/vda ] || echo "ERROR no /dev/vda"
for job in $(sed -n 's/.*guest_jobs=\([^ ]*\).*/\1/p' /proc/cmdline | tr ';' ' '); do
  set -- $(echo "$job" | tr ',' ' ')
  name=$1
  shift
  echo "START $name"
  /guest_io "$name" /dev/vda "$@" 2>&1
done
echo GUEST-DONE
poweroff -f
"""


def _run(argv, cwd=None, timeout=600):
    p = subprocess.run([str(a) for a in argv], cwd=cwd, timeout=timeout, capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited with {p.returncode}: "
                           f"{(p.stderr or p.stdout)[-800:]}")
    return p.stdout


def fetch_kernel(cache=DEFAULT_CACHE):
    """Downloads and unpacks the Debian kernel package once; returns the unpacked tree."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    dep = _run(["apt-cache", "depends", "linux-image-amd64"])
    names = re.findall(r"Depends: (linux-image-\S+)", dep)
    if not names:
        raise RuntimeError(f"apt-cache depends linux-image-amd64 names no kernel package:\n{dep}")
    root = cache / names[0]
    if (root / "boot").is_dir():
        return root
    for old in cache.glob("*.deb"):
        old.unlink()
    _run(["apt-get", "download", names[0]], cwd=cache, timeout=1800)
    deb = next(cache.glob("*.deb"))
    tmp = cache / "unpack"
    shutil.rmtree(tmp, ignore_errors=True)
    _run(["dpkg-deb", "-x", deb, tmp])
    tmp.rename(root)  # only a whole tree gets the final name
    deb.unlink()
    return root


def module_order(kroot, wanted):
    """The .ko files of `wanted` and of what they depend on, each after its dependencies."""
    files = {p.stem.replace("-", "_"): p for p in kroot.glob("lib/modules/*/kernel/**/*.ko")}
    order, seen = [], set()

    def visit(name):
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        path = files.get(name)
        if path is None:
            return  # built into the kernel
        for dep in filter(None, _run(["modinfo", "-F", "depends", path]).strip().split(",")):
            visit(dep)
        order.append(path)

    for w in wanted:
        visit(w)
    return order


class GuestImage:
    """The kernel and initramfs to boot; built in `work` from the cached kernel package."""

    def __init__(self, work, cache=DEFAULT_CACHE):
        kroot = fetch_kernel(cache)
        tree = Path(work) / "initramfs"
        shutil.rmtree(tree, ignore_errors=True)
        for d in ("bin", "proc", "sys", "dev", "modules"):
            (tree / d).mkdir(parents=True)
        shutil.copy("/bin/busybox", tree / "bin" / "busybox")
        _run(["g++", "-std=c++20", "-O2", "-static", "-pthread", "-o", tree / "guest_io",
              HERE / "guest_io.cc"])
        self.modules = module_order(kroot, GUEST_MODULES)
        if not any(m.stem == "virtio_blk" for m in self.modules):
            raise RuntimeError(f"no virtio_blk module in {kroot}")
        for m in self.modules:
            shutil.copy(m, tree / "modules" / m.name)
        (tree / "modules.order").write_text("".join(m.name + "\n" for m in self.modules))
        (tree / "init").write_text(INIT)
        (tree / "init").chmod(0o755)
        self.initramfs = Path(work) / "initramfs.cpio"
        files = subprocess.run("find . | sort", shell=True, cwd=tree, capture_output=True,
                               check=True).stdout
        with open(self.initramfs, "wb") as out:
            subprocess.run(["/bin/busybox", "cpio", "-o", "-H", "newc"], cwd=tree, input=files,
                           stdout=out, stderr=subprocess.DEVNULL, check=True)
        shutil.rmtree(tree)
        self.kernel = sorted(kroot.glob("boot/vmlinuz-*"))[-1]

    def describe(self):
        return (f"{self.kernel.name}, modules {', '.join(m.stem for m in self.modules)}, "
                f"initramfs {self.initramfs.stat().st_size // 1024} KiB")


class Guest:
    """One boot. `jobs` is a list of guest_io argument lists (without the device), run in order.
    The disk is attached as `drive` (a -drive spec without if=/cache=/aio=) with
    cache=none,aio=io_uring."""

    def __init__(self, image, drive, jobs, log_path, mem_mib=1024, cpus=2):
        spec = ";".join(",".join(str(a) for a in job) for job in jobs)
        self.argv = ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max",
                     "-m", str(mem_mib), "-smp", str(cpus), "-display", "none",
                     "-monitor", "none", "-serial", "stdio", "-no-reboot",
                     "-kernel", image.kernel, "-initrd", image.initramfs,
                     "-append", f"console=ttyS0 quiet panic=-1 guest_jobs={spec}",
                     "-drive", f"{drive},if=virtio,cache=none,aio=io_uring"]
        self.log_path = Path(log_path)
        self.lines = []
        self.proc = None

    def start(self):
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([str(a) for a in self.argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace")
        # The console is read by a thread so that a silent guest cannot block a deadline.
        self.queue = queue.Queue()
        self.reader = threading.Thread(target=self._read_console, daemon=True)
        self.reader.start()
        return self

    def _read_console(self):
        for line in self.proc.stdout:
            self.queue.put(line.replace("\r", "").rstrip("\n"))
        self.queue.put(None)

    def read_until(self, prefix, timeout):
        """Reads console lines until one starts with `prefix`; returns it, or None when the
        guest ended first. Raises TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"guest: no {prefix!r} within {timeout} s; last lines: "
                                   f"{self.lines[-10:]}") from None
            if line is None:
                self.queue.put(None)  # later calls see the end too
                return None
            self.log.write(line + "\n")
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def finish(self, timeout):
        """Waits for the guest to power off; returns {job: value} from its RESULT lines and
        raises if a job failed or the guest did not get to the end."""
        self.read_until("GUEST-DONE", timeout)
        self.read_until("\0", 60)  # the rest, up to QEMU's exit
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        errors = [x for x in self.lines if x.startswith("ERROR")]
        if errors or "GUEST-DONE" not in self.lines:
            tail = "\n".join(self.lines[-30:])
            raise RuntimeError(f"guest failed (qemu exit {self.proc.returncode}): "
                               f"{errors or tail}")
        return {m[0]: float(m[1]) for m in
                (re.match(r"RESULT (\S+) (\S+)", x).groups() for x in self.lines
                 if x.startswith("RESULT "))}

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self.log.closed:
            self.log.close()


def boot(image, drive, jobs, log_path, timeout=600, mem_mib=1024):
    """Boots, runs `jobs`, waits for power-off; returns the RESULT values."""
    g = Guest(image, drive, jobs, log_path, mem_mib=mem_mib).start()
    try:
        return g.finish(timeout)
    finally:
        g.kill()
