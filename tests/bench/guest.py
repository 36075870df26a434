#!/usr/bin/env python3
"""imgfs guest benchmark: a QEMU guest (TCG) whose disk is NAME.raw on an imgfs mount, against
the same guest whose QEMU opens the qcow2 chain itself.

This is the comparison a user makes: a VM can use the chain directly (QEMU's qcow2 driver) or use
the flat file imgfs exports. Each round boots Debian's kernel with a busybox initramfs per
contender, on its own copy of the chain (a base full of data, a fresh empty overlay), with caches
dropped first. The guest (tests/guest/guest_vm.py) loads virtio_blk and runs guest_io
(tests/guest/guest_io.cc) on /dev/vda:

  seqwrite   1 MiB O_DIRECT writes into the fresh overlay, then fsync (allocating writes)
  seqread    1 MiB O_DIRECT reads of data that only the base holds
  randread   4 KiB random reads over the whole disk, queue depth 8 (8 threads)
  randwrite  4 KiB random writes into the region seqwrite allocated, queue depth 8

Every disk is attached with cache=none,aio=io_uring. After each boot the chain must pass
`qemu-img check` and still show the base's data where the guest did not write. The result is a
markdown table of medians with ratios to QEMU opening the chain (stdout and --out).

Run it through tests/bench/run.sh --suite guest (installs packages, builds build-rel). Needs root.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "tests" / "guest"))
import guest_vm  # noqa: E402  (tests/guest: the guest image and one boot)
MIB = 1024 * 1024

JOBS = ["seqwrite", "seqread", "randread", "randwrite"]
JOB_LABEL = {
    "seqwrite": "allocating 1M writes + fsync",
    "seqread": "1M reads from the base",
    "randread": "4k randread QD8",
    "randwrite": "4k randwrite QD8, allocated",
}
CONTENDERS = ["qemu-qcow2", "imgfs", "imgfs-direct"]
CONTENDER_LABEL = {
    "qemu-qcow2": "QEMU opens the chain (format=qcow2)",
    "imgfs": "NAME.raw on imgfs",
    "imgfs-direct": "NAME.raw on imgfs -o direct",
}
BASELINE = "qemu-qcow2"


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(argv, timeout=600, cwd=None, check=True):
    p = subprocess.run([str(a) for a in argv], cwd=cwd, timeout=timeout, capture_output=True,
                       text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited with {p.returncode}: "
                           f"{(p.stderr or p.stdout)[-800:]}")
    return p


# ---------------------------------------------------------------------------------------------
# Contenders: each gets a fresh copy of the chain and yields the disk QEMU attaches.

class Chain:
    """A copy of the source chain (base.qcow2 full of data, empty overlay vm.qcow2) in d/img."""

    def __init__(self, src, d):
        self.dir = d / "img"
        self.dir.mkdir(parents=True)
        run(["cp", "--reflink=auto", "--sparse=always", src / "base.qcow2", self.dir])
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             "vm.qcow2"], cwd=self.dir)

    def check(self, args):
        """qemu-img check is clean, and the base's bytes show past what the guest wrote."""
        for layer in ("vm.qcow2", "base.qcow2"):
            p = run(["qemu-img", "check", self.dir / layer], check=False)
            if p.returncode != 0:
                raise RuntimeError(f"qemu-img check {layer}: {p.stdout[-600:]}")
        tail = args.write_mib + args.read_mib
        p = run(["qemu-io", "-r", "-f", "qcow2", "-c",
                 f"read -P 0xa5 {tail * MIB} {(args.disk_mib - tail) * MIB}",
                 self.dir / "vm.qcow2"], check=False)
        if p.returncode != 0 or "Pattern verification failed" in p.stdout:
            raise RuntimeError(f"the chain lost the base's data past {tail} MiB: {p.stdout[-400:]}")


class QemuQcow2:
    def __init__(self, key, imgfs, chain, work, options):
        self.chain = chain
        self.drive = f"file={chain.dir / 'vm.qcow2'},format=qcow2"
        self.daemon = None

    def stop(self):
        pass


class ImgfsMount:
    def __init__(self, key, imgfs, chain, work, options):
        self.imgfs = imgfs
        self.mnt = work / "mnt"
        self.mnt.mkdir()
        opts = [o for o in options.split(",") if o] + (["direct"] if key == "imgfs-direct" else [])
        opts = ["-o", ",".join(opts)] if opts else []
        self.log = open(work / "imgfs.log", "w")
        self.daemon = subprocess.Popen([imgfs, "mount", "-f"] + opts + [chain.dir, self.mnt],
                                       stdout=self.log, stderr=subprocess.STDOUT)
        target = self.mnt / "vm.raw"
        deadline = time.monotonic() + 60
        while not (os.path.ismount(self.mnt) and target.exists()):
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                self.daemon.kill()
                self.daemon.wait()
                subprocess.run(["umount", "-l", self.mnt], capture_output=True)
                raise RuntimeError(f"imgfs did not export {target}: "
                                   f"{(work / 'imgfs.log').read_text()[-600:]}")
            time.sleep(0.05)
        info = json.loads((self.mnt / ".control" / "vm" / "info").read_text())
        self.transport = info.get("transport", "?")
        self.drive = f"file={target},format=raw"

    def stop(self):
        if self.daemon.poll() is not None:  # died during the boot: the error says so below
            subprocess.run(["umount", "-l", self.mnt], capture_output=True)
        else:
            run([self.imgfs, "unmount", self.mnt], timeout=120)
        try:
            self.daemon.wait(60)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            raise RuntimeError("imgfs still running 60 s after unmount")
        self.log.close()
        if self.daemon.returncode != 0:
            raise RuntimeError(f"imgfs exited with {self.daemon.returncode}")


def contender(args, key, chain, work):
    cls = QemuQcow2 if key == "qemu-qcow2" else ImgfsMount
    return cls(key, args.imgfs, chain, work, args.imgfs_options)


# ---------------------------------------------------------------------------------------------

def guest_jobs(args):
    w, r = args.write_mib, args.read_mib
    spec = {
        "seqwrite": ["seqwrite", 0, w],
        "seqread": ["seqread", w, r],
        "randread": ["randread", 0, args.disk_mib, 8, args.runtime],
        "randwrite": ["randwrite", 0, w, 8, args.runtime],
    }
    return [spec[j] for j in args.jobs]


def run_guest(args, image, drive, logfile):
    """Boots the guest on `drive`; returns {job: value} from its RESULT lines."""
    start = time.monotonic()
    results = guest_vm.boot(image, drive, guest_jobs(args), logfile, timeout=args.boot_timeout,
                            mem_mib=args.guest_mib)
    log(f"  boot + jobs {time.monotonic() - start:.0f} s: "
        + ", ".join(f"{j} {results.get(j, '?')}" for j in args.jobs))
    return results


def drop_caches():
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def prepare_source(args, src):
    src.mkdir(parents=True)
    base = src / "base.qcow2"
    log(f"creating a {args.disk_mib} MiB qcow2 base full of data")
    run(["qemu-img", "create", "-q", "-f", "qcow2", base, f"{args.disk_mib}M"])
    cmds = []
    for off in range(0, args.disk_mib, 64):
        n = min(64, args.disk_mib - off)
        cmds += ["-c", f"write -P 0xa5 {off}M {n}M"]
    run(["qemu-io", "-f", "qcow2"] + cmds + [base], timeout=1800)


def report(args, results, transports, started):
    lines = [f"## Guest benchmark, {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"`tests/bench/guest.py --rounds {args.rounds} --runtime {args.runtime}`: TCG guest "
             f"({args.guest_mib} MiB, 2 vCPUs), disk {args.disk_mib} MiB, "
             f"cache=none,aio=io_uring; medians of {args.rounds} rounds, "
             f"{(time.monotonic() - started) / 60:.1f} min in all.", ""]
    if transports:
        lines += [f"imgfs transport: {', '.join(sorted(transports))}.", ""]
    head = "| job | " + " | ".join(CONTENDER_LABEL[c] for c in args.contenders) + " |"
    lines += [head, "|---|" + "---:|" * len(args.contenders)]
    for job in args.jobs:
        unit = "MB/s" if job.startswith("seq") else "IOPS"
        base = results.get((job, BASELINE))
        cells = []
        for c in args.contenders:
            vals = results.get((job, c))
            if not vals:
                cells.append("n/a")
                continue
            med = statistics.median(vals)
            cell = f"{med:.0f} {unit}"
            if c != BASELINE and base:
                cell += f" ({med / statistics.median(base):.2f}×)"
            cell += f" [{min(vals):.0f}–{max(vals):.0f}]"
            cells.append(cell)
        lines.append(f"| {JOB_LABEL[job]} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios are to QEMU opening the chain; brackets give the range over rounds."]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--imgfs", default=str(ROOT / "build-rel" / "imgfs"))
    ap.add_argument("--imgfs-options", default="",
                    help="extra -o options for every imgfs mount, e.g. poll_us=0")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--runtime", type=int, default=10, help="seconds per random job")
    ap.add_argument("--disk-mib", type=int, default=1024)
    ap.add_argument("--write-mib", type=int, default=256, help="allocating write size")
    ap.add_argument("--read-mib", type=int, default=512, help="sequential read size")
    ap.add_argument("--guest-mib", type=int, default=1024, help="guest RAM")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--jobs", default=",".join(JOBS),
                    help="guest jobs, run in this order in each boot (default: all)")
    ap.add_argument("--boot-timeout", type=int, default=600)
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--out", default=str(HERE / "guest-results.md"))
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args(argv)
    args.contenders = [c for c in args.contenders.split(",") if c]
    args.jobs = [j for j in args.jobs.split(",") if j]
    bad = [j for j in args.jobs if j not in JOBS]
    if bad:
        ap.error(f"unknown job {', '.join(bad)}; known: {', '.join(JOBS)}")
    bad = [c for c in args.contenders if c not in CONTENDERS]
    if bad:
        ap.error(f"unknown contender {', '.join(bad)}; known: {', '.join(CONTENDERS)}")
    if args.write_mib + args.read_mib >= args.disk_mib:
        ap.error("--write-mib + --read-mib must be smaller than --disk-mib")
    return args


def main(argv):
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("guest.py: run as root (FUSE mounts, drop_caches)")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="imgfs-guest-", dir=args.workdir))
    try:
        image = guest_vm.GuestImage(work, Path(args.workdir) / "imgfs-guest-kernel")
        log(f"guest: {image.describe()}")
        prepare_source(args, work / "src")
        results, transports = {}, set()
        for rnd in range(args.rounds):
            order = args.contenders if rnd % 2 == 0 else list(reversed(args.contenders))
            for key in order:
                d = work / f"r{rnd}-{key}"
                log(f"round {rnd + 1}/{args.rounds}: {key}")
                chain = Chain(work / "src", d)
                c = contender(args, key, chain, d)
                try:
                    drop_caches()
                    got = run_guest(args, image, c.drive, d / "guest.log")
                finally:
                    c.stop()
                transports.add(getattr(c, "transport", None) or "")
                chain.check(args)
                for job, value in got.items():
                    results.setdefault((job, key), []).append(value)
                shutil.rmtree(chain.dir)
        text = report(args, results, {t for t in transports if t}, started)
        print(text)
        Path(args.out).write_text(text)
        log(f"report written to {args.out}")
    finally:
        if args.keep:
            log(f"scratch kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
