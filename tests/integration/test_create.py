#!/usr/bin/env python3
"""`imgfs create`: every image it makes passes `qemu-img check`, and `qemu-img info` shows what
was asked for (issue: qcow2 driver). Also `imgfs info` on the result, and clear refusals."""

import json
import os

import harness
from harness import run, qemu_img, check

MiB = 1 << 20

# (options, size, the fields of `qemu-img info --output=json` they must produce)
CASES = [
    ("", "64M", {"cluster-size": 65536, "compat": "1.1", "refcount-bits": 16,
                 "extended-l2": False, "lazy-refcounts": False}),
    ("cluster_size=512,refcount_bits=1", "8M", {"cluster-size": 512, "refcount-bits": 1}),
    ("cluster_size=4096,refcount_bits=64", "32M", {"cluster-size": 4096, "refcount-bits": 64}),
    ("cluster_size=2097152", "1G", {"cluster-size": 2 * MiB}),
    ("extended_l2=on", "256M", {"extended-l2": True}),
    ("lazy_refcounts=on", "16M", {"lazy-refcounts": True}),
    ("compat=0.10", "16M", {"compat": "0.10"}),
]


class Create(harness.ImageDirTest):
    def info(self, path):
        return json.loads(run(["qemu-img", "info", "--output=json", path]).stdout)

    def test_options_match_qemu_img_info_and_check_is_clean(self):
        for opts, size, want in CASES:
            with self.subTest(opts=opts):
                path = self.img(f"c{len(os.listdir(self.dir))}.qcow2")
                args = [harness.IMGFS, "create"] + (["-o", opts] if opts else []) + [path, size]
                run(args)
                info = self.info(path)
                self.assertEqual(info["format"], "qcow2")
                self.assertEqual(info["virtual-size"], int(size[:-1]) * (
                    MiB if size.endswith("M") else 1024 * MiB))
                self.assertEqual(info["cluster-size"], want.get("cluster-size",
                                                                info["cluster-size"]))
                specific = info["format-specific"]["data"]
                for key, value in want.items():
                    if key != "cluster-size":
                        self.assertEqual(specific[key], value, f"{key} for -o {opts}")
                c = check(path)
                self.assertEqual((c["corruptions"], c["leaks"], c["check-errors"]), (0, 0, 0),
                                 c["text"])

    def test_backing_name_and_format_are_recorded(self):
        qemu_img("create", "-q", "-f", "raw", self.img("base.raw"), "24M")
        run([harness.IMGFS, "create", "-b", "base.raw", "-F", "raw", self.img("mid.qcow2")])
        run([harness.IMGFS, "create", "-b", "mid.qcow2", "-F", "qcow2", "-o", "extended_l2=on",
             self.img("top.qcow2"), "48M"])
        mid = self.info(self.img("mid.qcow2"))
        self.assertEqual((mid["backing-filename"], mid["backing-filename-format"]),
                         ("base.raw", "raw"))
        self.assertEqual(mid["virtual-size"], 24 * MiB)  # taken from the backing file
        top = self.info(self.img("top.qcow2"))
        self.assertEqual((top["backing-filename"], top["backing-filename-format"]),
                         ("mid.qcow2", "qcow2"))
        self.assertEqual(top["virtual-size"], 48 * MiB)
        for f in ("mid.qcow2", "top.qcow2"):
            c = check(self.img(f))
            self.assertEqual((c["corruptions"], c["leaks"], c["check-errors"]), (0, 0, 0),
                             c["text"])
        ours = json.loads(run([harness.IMGFS, "info", "--json", self.img("top.qcow2")]).stdout)
        self.assertIn("mid.qcow2", json.dumps(ours))
        text = run([harness.IMGFS, "info", self.img("top.qcow2")]).stdout
        for line in ("layer 0: top.qcow2 (qcow2", "layer 1: mid.qcow2 (qcow2)",
                     "layer 2: base.raw (raw)", f"virtual size {48 * MiB} bytes",
                     f"virtual size {24 * MiB} bytes", "zlib compression, extended L2"):
            self.assertIn(line, text)
        self.assertNotIn("DIRTY", text)

    def test_sizes_and_options_in_qemu_img_syntax(self):
        # The same arguments to both tools must give the same image geometry.
        for size in ("1.5G", "512M", "10240k", "1000", "1.3k", "2T", "64m", "100000b"):
            with self.subTest(size=size):
                ours, theirs = self.img(f"ours{size}.qcow2"), self.img(f"theirs{size}.qcow2")
                run([harness.IMGFS, "create", ours, size])
                qemu_img("create", "-q", "-f", "qcow2", theirs, size)
                self.assertEqual(self.info(ours)["virtual-size"],
                                 self.info(theirs)["virtual-size"])
                self.assertEqual(check(ours)["exit"], 0)
        path = self.img("zstd.qcow2")
        run([harness.IMGFS, "create", "-o", "compression_type=zstd", path, "16M"])
        specific = self.info(path)["format-specific"]["data"]
        self.assertEqual(specific["compression-type"], "zstd")
        self.assertEqual(check(path)["exit"], 0)
        # qemu-img can write compressed clusters into it, and imgfs reads them back.
        data = self.img("data.raw")
        with open(data, "wb") as f:
            f.write(b"\x5c" * (MiB // 2) + bytes(MiB // 2))
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd",
                 data, self.img("conv.qcow2"))
        run([harness.IMGFS, "io", self.img("conv.qcow2"), "-c", "read -P 0x5c 0 512k",
             "-c", "read -P 0 512k 512k"])
        p = run([harness.IMGFS, "io", self.img("conv.qcow2"), "-c", "read -P 0x5c 512k 4k"],
                check=False)
        self.assertNotEqual(p.returncode, 0, "a pattern that is not there was not noticed")

    def test_snapshot_overlays_take_the_backing_layout(self):
        for opts, cluster, extl2 in (("cluster_size=65536", 65536, False),
                                     ("cluster_size=16384,extended_l2=on", 16384, True),
                                     ("cluster_size=4096", 4096, False)):
            with self.subTest(opts=opts):
                for f in os.listdir(self.dir):
                    os.unlink(self.img(f))
                run([harness.IMGFS, "create", "-o", opts, self.img("vm.qcow2"), "16M"])
                m = self.mount()
                run([harness.IMGFS, "snapshot", m.mountpoint, "vm", "s1"])
                m.stop()
                info = self.info(self.img("vm@s1.qcow2"))
                self.assertEqual(info["cluster-size"], cluster)
                self.assertEqual(info["format-specific"]["data"]["extended-l2"], extl2)

    def test_bad_input_is_refused_clearly(self):
        p = run([harness.IMGFS, "create", self.img("vm.raw"), "16M"], check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("give it a .qcow2 name", p.stderr)
        self.assertFalse(os.path.exists(self.img("vm.raw")))
        # 2^64 - 1 rounded up to whole sectors wrapped to an empty disk.
        for size in ("1.5", "12X", "-1", "1..5G", "G", "99999999999999999999E",
                     "18446744073709551615"):
            p = run([harness.IMGFS, "create", self.img("bad.qcow2"), size], check=False)
            self.assertNotEqual(p.returncode, 0, size)
            self.assertRegex(p.stderr, "size|option", size)
            self.assertFalse(os.path.exists(self.img("bad.qcow2")))
        # (4295032832 and 4294967312, cut to 32 bits, were 65536 and 16: valid, and taken.)
        for args in (["-o", "cluster_size=1000"], ["-o", "refcount_bits=3"],
                     ["-o", "cluster_size=4295032832"], ["-o", "refcount_bits=4294967312"],
                     ["-o", "bogus=1"], ["-F", "vmdk", "-b", "x.raw"],
                     ["-o", "compression_type=lz4"], ["-o", "compat=0.10,compression_type=zstd"]):
            with self.subTest(args=args):
                p = run([harness.IMGFS, "create"] + args + [self.img("bad.qcow2"), "16M"],
                        check=False)
                self.assertNotEqual(p.returncode, 0)
                self.assertTrue(p.stderr.strip(), "no reason printed")
                self.assertFalse(os.path.exists(self.img("bad.qcow2")), "a refused image exists")
        # A FIFO as the backing file: refused at once, not waited on.
        os.mkfifo(self.img("pipe.raw"))
        p = run([harness.IMGFS, "create", "-b", "pipe.raw", self.img("bad.qcow2")],
                check=False, timeout=20)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("is not a regular file", p.stderr)
        self.assertFalse(os.path.exists(self.img("bad.qcow2")))

    def test_other_commands_refuse_bad_arguments_with_the_reason(self):
        qemu_img("create", "-q", "-f", "qcow2", self.img("vm.qcow2"), "1M")
        os.mkdir(self.img("mnt"))
        vm, mnt = self.img("vm.qcow2"), self.img("mnt")
        # A mount option wrongly taken would leave a daemon serving: stop it whatever happens.
        self.addCleanup(lambda: harness.is_mounted(mnt) and run([harness.IMGFS, "unmount", mnt],
                                                                check=False))
        cases = [
            (["io", vm, "-c", "write 0xZZ 512"], "invalid number '0xZZ'"),
            (["io", vm, "-c", "write 0x 512"], "invalid number '0x'"),
            (["io", vm, "-c", "write 0xFFFFFFFFFFFFFFFFFF 512"], "invalid number"),
            (["io", vm, "-c", "read 0 15E"], "past the end of the disk"),
            (["io", vm, "-c", "write 0 2G"], "past the end of the disk"),
            (["io", vm, "-c", "write -P 300 0 512"], "-P takes a byte"),
            (["io", vm, "-c", "truncate 1048577"], "multiple of 512"),
            (["io", vm, "-c", "truncate"], "needs one SIZE"),
            (["create", "-b", "", self.img("new.qcow2"), "1G"], "-b needs a file name"),
            (["create", self.img("new.qcow2"), "-1G"], "not negative"),
            (["create", "-o", "cluster_size=", self.img("new.qcow2"), "1M"], "cluster_size="),
            (["create", "-b", "vm.qcow2", "-F", "vmdk", self.img("new.qcow2")], "raw or qcow2"),
            (["commit", mnt, "vm", "--base", ""], "--base needs a file name"),
            (["commit", mnt, "vm", "--base", "a.qcow2", "--base", "b.qcow2"], "once"),
            (["mount", "-o", "ceph_timeout=1k", self.dir, mnt], "ceph_timeout=1k: expected"),
            (["mount", "-o", "cache_size=", self.dir, mnt], "cache_size=: invalid size"),
            (["mount", "-o", "cache_size=0", self.dir, mnt], "cache_size=0"),
            (["mount", self.dir, mnt, "-o"], "-o needs"),
        ]
        for argv, reason in cases:
            with self.subTest(argv=argv):
                p = run([harness.IMGFS] + argv, check=False, timeout=30)
                self.assertEqual(p.returncode, 1, p.stderr)
                self.assertIn(reason, p.stderr)
                self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
                self.assertFalse(os.path.exists(self.img("new.qcow2")))
        self.assertFalse(harness.is_mounted(mnt))
        self.assertEqual(qemu_img("check", vm).returncode, 0)
        # The image was not written by any refused command.
        self.assertEqual(run([harness.IMGFS, "io", vm, "-c", "read -P 0 0 1M"]).returncode, 0)
        # -F raw over a qcow2 file: the new disk is the file's size, as qemu-img makes it.
        run([harness.IMGFS, "create", "-b", "vm.qcow2", "-F", "raw", self.img("over.qcow2")])
        self.assertEqual(self.info(self.img("over.qcow2"))["virtual-size"],
                         os.path.getsize(vm) + (-os.path.getsize(vm)) % 512)


if __name__ == "__main__":
    harness.main_with_summary("create")
