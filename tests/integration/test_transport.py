#!/usr/bin/env python3
"""The FUSE transport: FUSE-over-io_uring (uring=on|auto) and /dev/fuse (uring=off).

Each test switches the kernel's FUSE-over-io_uring on or off (the fuse module's enable_uring
parameter) and puts it back afterwards; integration tests run one at a time (RUN_SERIAL), so
no other mount sees the change. Data goes through NAME.raw the way users drive it (a loop
device with ext4 and fio with verification while snapshots are taken from a shell) and is
checked against qemu-img after unmounting."""
import json
import os
import platform
import subprocess
import time

import harness
from harness import run, qemu_img, check

MiB = 1 << 20
PARAM = "/sys/module/fuse/parameters/enable_uring"


class Transport(harness.ImageDirTest):
    def setUp(self):
        super().setUp()
        harness.require(os.path.exists(PARAM), PARAM + " (a kernel with FUSE-over-io_uring)")
        with open(PARAM) as f:
            saved = f.read().strip()
        self.addCleanup(self.set_uring, saved)

    def set_uring(self, value):
        with open(PARAM, "w") as f:
            f.write(value)

    def info(self, m, name):
        with open(m.path(".control", name, "info")) as f:
            return json.loads(f.read())

    def check_chain(self, files, top, model):
        """qemu-img check is clean on every file, and `top` reads as `model` in QEMU."""
        for f in files:
            c = check(self.img(f))
            self.assertEqual((c["corruptions"], c["check-errors"]), (0, 0), c["text"])
        out = self.img("oracle.out")
        qemu_img("convert", "-O", "raw", self.img(top), out)
        with open(out, "rb") as f:
            self.assertEqual(f.read(), bytes(model))
        os.unlink(out)

    def bare_mountpoint(self):
        """An image data.qcow2, the ring switched on, and an empty mount point for a mount the
        test makes itself (unmounted and removed afterwards)."""
        qemu_img("create", "-q", "-f", "qcow2", self.img("data.qcow2"), "16M")
        self.set_uring("Y")
        mnt = self.dir + "-mnt"
        os.mkdir(mnt)
        self.addCleanup(os.rmdir, mnt)
        self.addCleanup(lambda: harness.is_mounted(mnt) and run(["umount", "-l", mnt]))
        return mnt

    def pattern_roundtrip(self, m, name, size):
        """Writes seeded data of many sizes through NAME.raw, reads it back, returns the model."""
        model = bytearray(size)
        harness.random_writes(m.path(name + ".raw"), model, seed=7, count=300, max_len=2 * MiB)
        with open(m.path(name + ".raw"), "rb") as f:
            self.assertEqual(f.read(), bytes(model))
        return model

    def test_uring_on_serves_everything_through_the_ring(self):
        harness.require_tools("fio", "mkfs.ext4", "e2fsck", "losetup")
        self.set_uring("Y")
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "1G")
        qemu_img("create", "-q", "-f", "qcow2", self.img("data.qcow2"), "64M")
        m = self.mount("uring=on")
        self.assertIn("FUSE-over-io_uring", m.read_log())
        self.assertTrue(self.info(m, "vm")["transport"].startswith("io_uring ("))
        status = run([harness.IMGFS, "status", m.mountpoint]).stdout
        self.assertIn("transport: io_uring", status)
        model = self.pattern_roundtrip(m, "data", 64 * MiB)
        # ext4 on a loop device, fio with verification at queue depth 32, and snapshots taken
        # from a shell while it runs.
        dev = run(["losetup", "-f", "--show", "--direct-io=on", m.path("vm.raw")]).stdout.strip()
        fsdir = self.dir + "-fs"
        os.mkdir(fsdir)
        try:
            run(["mkfs.ext4", "-q", dev])
            run(["mount", dev, fsdir])
            fio = subprocess.Popen(
                ["fio", "--name=v", f"--directory={fsdir}", "--size=96M", "--rw=randrw",
                 "--bs=4k", "--iodepth=32", "--ioengine=libaio", "--direct=1",
                 "--verify=crc32c", "--verify_state_save=0", "--numjobs=2", "--runtime=20",
                 "--minimal"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for snap in ("s1", "s2"):
                time.sleep(2)
                run(["bash", "-c", f"echo {snap} > {m.path('.control', 'vm', 'snapshot')}"])
            out, err = fio.communicate(timeout=300)
            self.assertEqual(fio.returncode, 0, err)
            run(["umount", fsdir])
            self.assertEqual(run(["e2fsck", "-fn", dev], check=False).returncode, 0)
        finally:
            run(["umount", fsdir], check=False)
            run(["losetup", "-d", dev], check=False)
            os.rmdir(fsdir)
        served = self.info(m, "vm")["transport"]
        m.stop()
        self.check_chain(("vm.qcow2", "vm@s1.qcow2", "vm@s2.qcow2", "data.qcow2"), "data.qcow2",
                         model)
        self.assertTrue(served.startswith("io_uring ("), served)

    def fio_on_cpu(self, cpu, path, offset, size, seconds):
        """fio with verification on one CPU (so its requests use that CPU's ring queue)."""
        return subprocess.Popen(
            ["taskset", "-c", str(cpu), "fio", f"--name=cpu{cpu}", f"--filename={path}",
             f"--offset={offset}", f"--size={size}", "--rw=randrw", "--bs=4k", "--iodepth=32",
             "--ioengine=libaio", "--direct=1", "--verify=crc32c", "--verify_state_save=0",
             f"--runtime={seconds}", "--minimal"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def test_two_event_loops_serve_every_queue_and_survive_a_kill(self):
        harness.require_tools("fio", "taskset")
        self.set_uring("Y")
        cpus = sorted(os.sched_getaffinity(0))
        qemu_img("create", "-q", "-f", "qcow2", self.img("data.qcow2"), "64M")
        m = self.mount("uring=on,threads=2")
        served = self.info(m, "data")["transport"]
        self.assertIn("2 loops", served)
        self.assertIn("2 event loops", m.read_log())
        model = self.pattern_roundtrip(m, "data", 64 * MiB)
        # One fio per CPU, each on its own half, while a shell takes snapshots: requests come
        # in on every queue, so on both loops, and all of them run on the images' loop.
        half = 32 * MiB
        fios = [self.fio_on_cpu(cpus[i % len(cpus)], m.path("data.raw"), i * half, half, 15)
                for i in range(2)]
        for snap in ("s1", "s2"):
            time.sleep(2)
            run(["bash", "-c", f"echo {snap} > {m.path('.control', 'data', 'snapshot')}"])
        for f in fios:
            out, err = f.communicate(timeout=300)
            self.assertEqual(f.returncode, 0, err)
        with open(m.path("data.raw"), "rb") as f:
            model = bytearray(f.read())
        m.stop()
        self.check_chain(("data.qcow2", "data@s1.qcow2", "data@s2.qcow2"), "data@s2.qcow2", model)
        # kill -9 while both loops have requests in flight: the mount goes, nothing hangs, and
        # what was fsynced before the kill is there after it.
        m = self.mount("uring=on,threads=2")
        synced = os.urandom(MiB)
        fd = os.open(m.path("data.raw"), os.O_WRONLY)
        os.pwrite(fd, synced, 5 * MiB)
        os.fsync(fd)
        os.close(fd)
        fios = [self.fio_on_cpu(cpus[i % len(cpus)], m.path("data.raw"), (i + 1) * half // 2,
                                half // 2, 30) for i in range(2)]
        time.sleep(2)
        m.kill()
        for f in fios:
            f.communicate(timeout=120)  # fails with ENOTCONN: the daemon is gone
        m = self.mount("uring=on,threads=2")
        with open(m.path("data.raw"), "rb") as f:
            f.seek(5 * MiB)
            self.assertEqual(f.read(MiB), synced)
        m.stop()
        c = check(self.img("data@s2.qcow2"))
        self.assertEqual((c["corruptions"], c["check-errors"]), (0, 0), c["text"])

    def test_threads_option_is_checked(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("data.qcow2"), "16M")
        mnt = self.dir + "-mnt"
        os.mkdir(mnt)
        self.addCleanup(os.rmdir, mnt)
        for bad in ("0", "65", "two"):
            p = run([harness.IMGFS, "mount", "-o", "threads=" + bad, self.dir, mnt], check=False)
            self.assertNotEqual(p.returncode, 0)
            self.assertIn("threads", p.stderr)
            self.assertFalse(harness.is_mounted(mnt))
        # More loops than ring queues: capped, with a line saying so; /dev/fuse: one loop.
        self.set_uring("Y")
        m = self.mount("uring=on,threads=64")
        self.assertRegex(m.read_log(),
                         r"threads=64: the kernel keeps \d+ FUSE ring queues; using \d+ event loops")
        self.pattern_roundtrip(m, "data", 16 * MiB)
        m.stop()
        m = self.mount("uring=off,threads=2")
        self.assertEqual(self.info(m, "data")["transport"], "/dev/fuse")
        self.assertIn("served by one event loop", m.read_log())
        self.pattern_roundtrip(m, "data", 16 * MiB)
        m.stop()

    def test_uring_off_and_auto_without_kernel_support_serve_dev_fuse(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("data.qcow2"), "16M")
        self.set_uring("Y")
        m = self.mount("uring=off")
        self.assertEqual(self.info(m, "data")["transport"], "/dev/fuse")
        self.pattern_roundtrip(m, "data", 16 * MiB)
        m.stop()
        self.set_uring("N")
        m = self.mount("uring=auto")
        self.assertEqual(self.info(m, "data")["transport"], "/dev/fuse")
        # One line saying why.
        self.assertIn("enable_uring is N", m.read_log())
        self.pattern_roundtrip(m, "data", 16 * MiB)
        m.stop()
        # The default is auto: with the kernel's support switched on, the ring serves.
        self.set_uring("Y")
        m = self.mount()
        self.assertTrue(self.info(m, "data")["transport"].startswith("io_uring ("))
        self.pattern_roundtrip(m, "data", 16 * MiB)
        m.stop()

    def test_each_transport_serves_clients_that_wait_for_each_reply(self):
        """fio at queue depth 1, one and two jobs, on each transport. /dev/fuse read on the
        loop's thread once hung a uring=off mount here: a read io_uring retried inline found
        its request taken by another and slept until a request came that the client, waiting
        for its reply, never sent (FuseServer::reader)."""
        harness.require_tools("fio")
        qemu_img("create", "-q", "-f", "qcow2", self.img("data.qcow2"), "64M")
        run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x2c 0 64M", self.img("data.qcow2")])
        self.set_uring("Y")
        for options in ("uring=off", "uring=auto"):
            m = self.mount(options)
            for jobs in (1, 2):
                with self.subTest(options=options, jobs=jobs):
                    p = run(["fio", "--name=qd1", f"--filename={m.path('data.raw')}",
                             "--direct=1", "--ioengine=io_uring", "--rw=randread", "--bs=4k",
                             "--iodepth=1", f"--numjobs={jobs}", "--group_reporting",
                             "--time_based", "--runtime=3", "--output-format=json"],
                            check=False, timeout=60)
                    self.assertEqual(p.returncode, 0, p.stderr)
                    ios = json.loads(p.stdout)["jobs"][0]["read"]["total_ios"]
                    self.assertGreater(ios, 1000, f"{options}: {ios} reads in 3 s")
            m.stop()

    def test_uring_on_without_kernel_support_fails_the_mount(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("data.qcow2"), "16M")
        self.set_uring("N")
        mnt = self.dir + "-mnt"
        os.mkdir(mnt)
        self.addCleanup(os.rmdir, mnt)
        p = run([harness.IMGFS, "mount", "-o", "uring=on", self.dir, mnt], check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("uring=on: FUSE-over-io_uring is not available", p.stderr)
        self.assertIn("enable_uring is N", p.stderr)
        self.assertFalse(harness.is_mounted(mnt))
        p = run([harness.IMGFS, "mount", "-o", "uring=sometimes", self.dir, mnt], check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("uring=sometimes: expected auto, on or off", p.stderr)

    def test_uring_on_fails_the_mount_when_init_refuses_the_ring(self):
        """The kernel reads enable_uring when it sends INIT, after the daemon's own check: a
        switch-off in between makes INIT come without the ring. The mount must then fail with
        the reason, not be reported up and refuse every request. strace holds the daemon's
        mount(2) while the test switches the ring off."""
        harness.require_tools("strace")
        harness.require(platform.machine() == "x86_64", "x86_64 (mount(2) is syscall 165)")
        mnt = self.bare_mountpoint()
        self.addCleanup(harness.kill_all, "imgfs mount -o uring=on " + self.dir)
        p = subprocess.Popen(
            ["strace", "-f", "-o", "/dev/null", "-e", "trace=mount", "-e",
             "inject=mount:delay_enter=2s", harness.IMGFS, "mount", "-o", "uring=on",
             self.dir, mnt],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: p.poll() is not None or p.kill())
        deadline = time.monotonic() + 20
        while not self.process_in_mount_syscall():
            self.assertIsNone(p.poll(), "the daemon exited before mount(2)")
            self.assertLess(time.monotonic(), deadline, "the daemon never reached mount(2)")
            time.sleep(0.01)
        self.set_uring("N")
        _, err = p.communicate(timeout=60)
        self.assertNotEqual(p.returncode, 0, err)
        self.assertIn("uring=on: FUSE-over-io_uring is not available: the kernel did not offer "
                      "it in INIT", err)
        self.assertFalse(harness.is_mounted(mnt))
        # The daemon has gone, and no image was harmed.
        self.assertEqual(run(["pgrep", "-f", "imgfs mount -o uring=on " + self.dir],
                             check=False).returncode, 1)
        c = check(self.img("data.qcow2"))
        self.assertEqual((c["corruptions"], c["check-errors"]), (0, 0), c["text"])

    def test_a_refused_ring_registration_fails_uring_on_and_falls_back_for_auto(self):
        """INIT can take the ring and the kernel still refuse to register its entries (here:
        one queue more than the kernel keeps, ring_queues=). uring=on must then fail the mount
        with the reason instead of reporting it up; auto serves /dev/fuse and says so in one
        line, with status naming /dev/fuse, not a ring that never served."""
        with open("/sys/devices/system/cpu/possible") as f:
            cpus = 0
            for part in f.read().strip().split(","):
                first, _, last = part.partition("-")
                cpus += int(last or first) - int(first) + 1
        mnt = self.bare_mountpoint()
        too_many = f"ring_queues={cpus + 1}"
        p = run([harness.IMGFS, "mount", "-o", "uring=on," + too_many, self.dir, mnt],
                check=False, timeout=60)
        self.assertNotEqual(p.returncode, 0, p.stderr)
        self.assertIn("uring=on: FUSE-over-io_uring is not available: the kernel refused", p.stderr)
        self.assertIn(f"(queue {cpus}: Invalid argument)", p.stderr)
        self.assertFalse(harness.is_mounted(mnt))
        deadline = time.monotonic() + 20
        while run(["pgrep", "-f", f"imgfs mount -o uring=on,{too_many}"],
                  check=False).returncode == 0:
            self.assertLess(time.monotonic(), deadline, "the daemon outlived its failed mount")
            time.sleep(0.1)

        # auto serves whatever the kernel does with the entries that did register. Kernels
        # differ: 6.18 switches to the ring once its own queues hold entries and refuses only
        # the extra queue's; others stop taking entries after a refusal, which leaves
        # /dev/fuse. The log line, the status and the requests must agree either way.
        m = self.mount("uring=auto," + too_many)
        model = self.pattern_roundtrip(m, "data", 16 * MiB)
        transport = self.info(m, "data")["transport"]
        log = m.read_log()
        uring_lines = [line for line in log.splitlines() if "uring=" in line]
        self.assertEqual(len(uring_lines), 1, log)
        self.assertIn(f"the kernel refused 64 of {64 * (cpus + 1)} ring entries (queue {cpus}: "
                      "Invalid argument)", uring_lines[0])
        if "serving /dev/fuse" in uring_lines[0]:
            self.assertTrue(transport.startswith(
                "/dev/fuse (FUSE-over-io_uring unused: the kernel refused "), transport)
            self.assertNotIn("through io_uring", log)
        else:
            self.assertIn("uring=auto: serving through FUSE-over-io_uring", uring_lines[0])
            self.assertIn("through io_uring (", log)
            self.assertRegex(transport, rf"^io_uring \({cpus + 1} queues x 64 entries, \d loops?, "
                                        r"64 entries refused: Invalid argument\)$")
        m.stop()
        self.check_chain(["data.qcow2"], "data.qcow2", model)

    @staticmethod
    def process_in_mount_syscall():
        """Whether an imgfs process is inside mount(2) (x86_64 syscall 165)."""
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/syscall") as f:
                    number = f.read().split()[0]
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
            except (OSError, IndexError):
                continue
            if number == "165" and "imgfs" in stat:
                return True
        return False


if __name__ == "__main__":
    harness.main()
