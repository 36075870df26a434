#!/usr/bin/env python3
"""A real guest as the client: a QEMU guest (TCG) boots with NAME.raw as its virtio disk
(cache=none, aio=io_uring, as the guest benchmark attaches it) and drives it with O_DIRECT
I/O from inside, while the host takes a live snapshot through the control file.

The guest (tests/guest/guest_vm.py) is Debian's kernel with a busybox initramfs; it powers off
without a clean shutdown, and the daemon is then killed, so what survives is what the guest's
fsync made durable. QEMU's tools check every layer afterwards, and a second boot reads the data
back through a new mount.
"""
import os
import sys
import tempfile

import harness
from harness import qemu_img, qemu_io, check, run

sys.path.insert(0, os.path.join(harness.ROOT, "tests", "guest"))
import guest_vm  # noqa: E402

MiB = 1 << 20
DISK_MIB = 96
WRITE_MIB = 32  # guest_io seqwrite: 0x6b over [0, 32 MiB), then fsync
RANDOM_MIB = (32, 16)  # guest_io randwrite: 0x3c in 4 KiB blocks over [32, 48 MiB)
BASE_BYTE = 0xA5  # the base's data; untouched from 48 MiB on


class GuestDisk(harness.ImageDirTest):
    @classmethod
    def setUpClass(cls):
        cls.work = tempfile.mkdtemp(prefix="imgfs-guest-")
        cls.image = None
        cls.image_error = None
        try:
            cls.image = guest_vm.GuestImage(cls.work)
        except Exception as e:  # reported by each test: skipped outside CI, failed in it
            cls.image_error = e

    @classmethod
    def tearDownClass(cls):
        harness.run(["rm", "-rf", cls.work], check=False)

    def setUp(self):
        super().setUp()
        harness.require_tools("qemu-system-x86_64", "busybox", "g++", "apt-get", "modinfo")
        harness.require(self.image is not None,
                        f"a guest kernel and initramfs ({self.image_error})")
        qemu_img("create", "-q", "-f", "qcow2", self.img("base.qcow2"), f"{DISK_MIB}M")
        qemu_io(self.img("base.qcow2"), f"write -P {BASE_BYTE} 0 {DISK_MIB}M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                 self.img("vm.qcow2"))

    def boot(self, m, jobs, name):
        return guest_vm.Guest(self.image, f"file={m.path('vm.raw')},format=raw", jobs,
                              os.path.join(self.dir, name + ".log")).start()

    def read_pattern(self, layer, offset_mib, size_mib, byte):
        """QEMU reads `byte` everywhere in the range, through the layer's chain."""
        p = run(["qemu-io", "-r", "-f", "qcow2", "-c",
                 f"read -P {byte} {offset_mib}M {size_mib}M", self.img(layer)], check=False)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertNotIn("verification failed", p.stdout + p.stderr)

    def test_guest_writes_through_a_live_snapshot_and_a_crash(self):
        m = self.mount()
        g = self.boot(m, [["seqwrite", 0, WRITE_MIB],
                          ["randwrite", *RANDOM_MIB, 8, 6],
                          ["verify", 0, WRITE_MIB, 0x6B]], "boot1")
        try:
            # The snapshot lands while the guest's random writes are in flight.
            self.assertIsNotNone(g.read_until("START randwrite", 300), g.lines[-20:])
            with open(m.path(".control", "vm", "snapshot"), "w") as f:
                f.write("live\n")
            results = g.finish(300)
        finally:
            g.kill()
        self.assertIn("seqwrite", results)
        self.assertGreater(results["randwrite"], 0)
        self.assertEqual(results["verify"], WRITE_MIB)
        self.assertTrue(os.path.exists(self.img("vm@live.qcow2")))
        # The guest powered off without a clean shutdown; now the daemon dies too.
        m.kill()
        layers = ["base.qcow2", "vm@live.qcow2", "vm.qcow2"]
        for layer in layers:
            c = check(self.img(layer))
            self.assertEqual((c["corruptions"], c["check-errors"]), (0, 0), layer + c["text"])
        # What the guest fsynced before the snapshot is in the frozen layer (vm.qcow2) and reads
        # the same through the new top (vm@live.qcow2); the base shows past the random writes.
        self.read_pattern("vm.qcow2", 0, WRITE_MIB, 0x6B)
        self.read_pattern("vm@live.qcow2", 0, WRITE_MIB, 0x6B)
        self.read_pattern("vm@live.qcow2", sum(RANDOM_MIB), DISK_MIB - sum(RANDOM_MIB), BASE_BYTE)

        # A second boot on a new mount reads it back from inside the guest.
        m2 = self.mount()
        g = self.boot(m2, [["verify", 0, WRITE_MIB, 0x6B],
                           ["verify", sum(RANDOM_MIB), DISK_MIB - sum(RANDOM_MIB), BASE_BYTE],
                           ["seqread", 0, DISK_MIB]], "boot2")
        try:
            results = g.finish(300)
        finally:
            g.kill()
        self.assertEqual(results["verify"], DISK_MIB - sum(RANDOM_MIB))
        m2.stop()
        for layer in layers:
            c = check(self.img(layer))
            self.assertEqual((c["corruptions"], c["check-errors"]), (0, 0), layer + c["text"])


if __name__ == "__main__":
    harness.main_with_summary("guest")
