#!/usr/bin/env python3
"""Malformed images: a battery of corrupted qcow2 images and hostile backing chains.

Small valid images are made with qemu-img/qemu-io ("templates"), copied, and patched with
struct at the offsets of QEMU's docs/interop/qcow2.txt. Every case is one image (or one chain)
in an image directory that also holds a healthy image, good.qcow2; one imgfs mount serves a
whole directory of cases. CASES below is the documented table: for each case how it is built
and the expected outcome, one of

  REFUSED           NAME.raw is absent, the daemon's log names the problem (a specific
                    substring), and no file of the case is modified (sha256 before == after).
  EIO_RANGE         NAME.raw is exported; reading the damaged range fails with EIO; reading
                    the undamaged ranges works and matches `qemu-img convert` of the original
                    (pre-corruption) image. The corrupt bit is not set (the damage is data, not
                    metadata), unless the case says otherwise.
  CORRUPT_ON_WRITE  NAME.raw is exported; reading the damaged range (if the damage is one that
                    reads reach) fails with EIO, a write that reaches the damage fails with EIO,
                    and afterwards the corrupt bit (incompatible features bit 1, bytes 72..79)
                    is set in the file. Undamaged ranges keep reading correctly. Each such
                    case has two copies of its image in the directory: in NAME the write
                    meets the damage first (the write path must find it), in NAME_r the reads
                    do (the read path must find it).

For every case, and for every directory: the daemon neither crashes nor hangs (every operation
runs in a thread with a timeout, the mount stays up, the daemon exits 0 on unmount), its memory
stays bounded (VmHWM < 200 MiB), and good.raw keeps serving its content.

At the end one line is printed: `malformed images: N cases run, M passed`.
`python3 test_malformed.py --table` prints the table of cases and exits.
"""

import errno
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import harness
from harness import run, qemu_img, qemu_io, convert_raw

KiB = 1 << 10
MiB = 1 << 20

REFUSED = "REFUSED"
EIO_RANGE = "EIO_RANGE"
CORRUPT_ON_WRITE = "CORRUPT_ON_WRITE"

# Every operation on the mount has this long to return (other processes may load the CPU).
OP_TIMEOUT = float(os.environ.get("IMGFS_MALFORMED_OP_TIMEOUT", "30"))
# The bound on the daemon's peak RSS (VmHWM). The plain build peaks below 30 MiB; under ASan
# (scripts/test.sh --sanitize sets IMGFS_MEM_LIMIT_MB) shadow memory and the quarantine of
# freed blocks add a few hundred MiB, still a bound.
MEM_LIMIT = int(os.environ.get("IMGFS_MEM_LIMIT_MB", "200")) * MiB

# qcow2 constants (docs/interop/qcow2.txt).
COPIED = 1 << 63
COMPRESSED = 1 << 62
OFFSET_MASK = 0x00FFFFFFFFFFFE00
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1


# ---------------------------------------------------------------------------------------------
# A qcow2 file to patch.

class Qcow2File:
    """The bytes of one qcow2 image, with accessors for the fields the cases patch."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            self.b = bytearray(f.read())

    def save(self):
        with open(self.path, "wb") as f:
            f.write(self.b)

    def u32(self, off):
        return struct.unpack_from(">I", self.b, off)[0]

    def u64(self, off):
        return struct.unpack_from(">Q", self.b, off)[0]

    def put32(self, off, v):
        struct.pack_into(">I", self.b, off, v & 0xFFFFFFFF)

    def put64(self, off, v):
        struct.pack_into(">Q", self.b, off, v & 0xFFFFFFFFFFFFFFFF)

    # Header fields.
    @property
    def cluster_bits(self):
        return self.u32(20)

    @property
    def cluster_size(self):
        return 1 << self.cluster_bits

    @property
    def l1_offset(self):
        return self.u64(40)

    @property
    def rt_offset(self):
        return self.u64(48)

    @property
    def incompatible(self):
        return self.u64(72)

    @property
    def header_length(self):
        return self.u32(100)

    @property
    def extended_l2(self):
        return bool(self.incompatible & (1 << 4))

    def set_incompatible(self, bits):
        self.put64(72, self.incompatible | bits)

    # L1 / L2.
    def l1(self, i):
        return self.u64(self.l1_offset + 8 * i)

    def set_l1(self, i, v):
        self.put64(self.l1_offset + 8 * i, v)

    def _entry_bytes(self):
        return 16 if self.extended_l2 else 8

    def l1_index(self, guest):
        entries = self.cluster_size // self._entry_bytes()
        return guest // (self.cluster_size * entries)

    def l2_table(self, guest):
        off = self.l1(self.l1_index(guest)) & OFFSET_MASK
        assert off != 0, f"{self.path}: no L2 table for guest offset {guest:#x}"
        return off

    def l2_pos(self, guest):
        entries = self.cluster_size // self._entry_bytes()
        return self.l2_table(guest) + ((guest // self.cluster_size) % entries) * self._entry_bytes()

    def l2(self, guest):
        return self.u64(self.l2_pos(guest))

    def set_l2(self, guest, v):
        self.put64(self.l2_pos(guest), v)

    def set_l2_bitmap(self, guest, v):
        assert self.extended_l2
        self.put64(self.l2_pos(guest) + 8, v)

    def host(self, guest):
        e = self.l2(guest)
        assert e & OFFSET_MASK and not e & COMPRESSED, f"guest {guest:#x} is not a data cluster"
        return e & OFFSET_MASK

    def compressed(self, guest):
        """(host offset, bytes) of the compressed cluster at `guest`."""
        e = self.l2(guest)
        assert e & COMPRESSED, f"guest {guest:#x} is not compressed"
        x = 62 - (self.cluster_bits - 8)
        off = e & ((1 << x) - 1)
        sectors = ((e & ~(COPIED | COMPRESSED)) >> x) + 1
        return off, sectors * 512 - (off & 511)

    # Refcounts (16-bit refcounts, the default, assumed).
    def rt(self, i):
        return self.u64(self.rt_offset + 8 * i)

    def set_rt(self, i, v):
        self.put64(self.rt_offset + 8 * i, v)

    def set_refcount(self, host_offset, value):
        assert self.u32(96) == 4
        cluster = host_offset // self.cluster_size
        per_block = self.cluster_size // 2
        block = self.rt(cluster // per_block) & OFFSET_MASK
        struct.pack_into(">H", self.b, block + 2 * (cluster % per_block), value)

    # Header extensions.
    def extensions(self):
        """[(position of the extension header, type, length)] up to the end marker."""
        out = []
        pos = self.header_length
        while pos + 8 <= self.cluster_size:
            t, n = struct.unpack_from(">II", self.b, pos)
            out.append((pos, t, n))
            if t == 0:
                break
            pos += 8 + ((n + 7) & ~7)
        return out

    def find_ext(self, ext_type):
        for pos, t, n in self.extensions():
            if t == ext_type:
                return pos, n
        raise AssertionError(f"{self.path}: no header extension {ext_type:#x}")

    def remove_ext(self, ext_type):
        """Rewrites the extension area without `ext_type` (the backing file name, stored past
        the area, stays where it is)."""
        start = self.header_length
        area = b""
        end = start
        for pos, t, n in self.extensions():
            size = 8 + ((n + 7) & ~7) if t != 0 else 8
            end = pos + size
            if t != ext_type:
                area += bytes(self.b[pos:pos + size])
        self.b[start:end] = area + bytes(end - start - len(area))


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def corrupt_bit_set(path):
    with open(path, "rb") as f:
        f.seek(72)
        return bool(struct.unpack(">Q", f.read(8))[0] & INCOMPAT_CORRUPT)


def dirty_bit_set(path):
    with open(path, "rb") as f:
        f.seek(72)
        return bool(struct.unpack(">Q", f.read(8))[0] & INCOMPAT_DIRTY)


# ---------------------------------------------------------------------------------------------
# Templates: the valid images the corruptions start from, made once per run (with known
# patterns, so that the cases can name damaged and undamaged ranges).

def _make_s64(path):
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    qemu_io(path, "write -P 0x11 0 64k", "write -P 0x22 1M 64k", "write -P 0x33 2M 64k")


def _make_s4k(path):
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "8M")
    qemu_io(path, "write -P 0x11 0 8k", "write -P 0x22 2M 8k", "write -P 0x33 4M 8k",
            "write -P 0x44 6M 4k")


def _make_lazy(path):
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "4M")
    qemu_io(path, "write -P 0x11 0 64k", "write -P 0x22 1M 64k", "write -P 0x33 2M 64k")


def _make_compressed(path, ctype):
    src = path + ".src"
    qemu_img("create", "-q", "-f", "raw", src, "4M")
    qemu_io(src, "write -P 0x51 0 256k", "write -P 0x52 1M 128k", "write -P 0x53 3M 64k",
            fmt="raw")
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", src, path)
    os.unlink(src)


def _make_ext(path):
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", path, "4M")
    qemu_io(path, "write -P 0x61 0 64k", "write -P 0x62 1M 64k", "write -P 0x63 2M 64k",
            f"write -P 0x64 {3 * MiB + 2 * KiB} 2k")


TEMPLATES = {
    "s64": _make_s64,   # 64 KiB clusters, 4 MiB: data at 0, 1M, 2M (64k each)
    "s4k": _make_s4k,   # 4 KiB clusters (one L2 table maps 2 MiB), 8 MiB: data at 0, 2M, 4M, 6M
    "lazy": _make_lazy,  # as s64, lazy_refcounts=on
    "zlib": lambda p: _make_compressed(p, "zlib"),  # compressed: 0..256k, 1M..1M+128k, 3M..+64k
    "zstd": lambda p: _make_compressed(p, "zstd"),
    "ext": _make_ext,    # extended L2, 64 KiB clusters (2 KiB subclusters)
}


# ---------------------------------------------------------------------------------------------
# Builders. A template case gets `q`, a Qcow2File of its fresh copy of the template (saved
# afterwards); a directory case gets (ctx, image_dir) and makes its own files.

def set_field(offset, value, width=4):
    def build(q):
        (q.put32 if width == 4 else q.put64)(offset, value)
    return build


def b_ext_len_past_cluster(q):
    pos, _ = q.find_ext(EXT_FEATURE_TABLE)
    q.put32(pos + 4, q.cluster_size)


def b_ext_unknown_len_huge(q):
    pos = [p for p, t, _ in q.extensions() if t == 0][0]
    q.put32(pos, 0x1A2B3C4D)
    q.put32(pos + 4, 0xFFFFFFF0)


def b_unknown_incompat_named(q):
    pos, n = q.find_ext(EXT_FEATURE_TABLE)
    entry = pos + 8 + n - 48  # the table's last entry now names bit 40
    q.b[entry:entry + 48] = bytes([0, 40]) + b"imgfs-test-future-feature".ljust(46, b"\0")
    q.set_incompatible(1 << 40)


def b_backing_offset_beyond_cluster(q):
    q.put64(8, 2 * q.cluster_size)
    q.put32(16, 8)


def b_backing_size_1024(q):
    q.put64(8, 4096)
    q.put32(16, 1024)
    q.b[4096:4096 + 1024] = b"b" * 1024


def b_snapshot_beyond_eof(q):
    q.put32(60, 1)
    q.put64(64, 0x7FFF0000)


def b_snapshot_unaligned(q):
    q.put32(60, 1)
    q.put64(64, q.cluster_size + 8)


def b_nb_snapshots_huge(q):
    q.put32(60, 0x7FFFFFFF)
    q.put64(64, q.cluster_size)


def _append_snapshot_table(q, entries):
    """Appends a cluster holding snapshot table `entries` (bytes) and points the header at it."""
    cs = q.cluster_size
    at = (len(q.b) + cs - 1) // cs * cs
    q.b += bytes(at - len(q.b)) + entries.ljust(cs, b"\0")
    return at


def _snapshot_entry(l1_offset, l1_size, name, extra=0):
    e = struct.pack(">QIHHIIQII", l1_offset, l1_size, 1, len(name), 0, 0, 0, 0, extra)
    return e + b"1" + name.encode()


def b_snapshot_extra_huge(q):
    # Entry 0 says 0xfffffff0 bytes of extra data follow: it runs past the table and the file.
    at = _append_snapshot_table(q, _snapshot_entry(0, 0, "s1", extra=0xFFFFFFF0))
    q.put32(60, 2)
    q.put64(64, at)


def b_snapshot_l1_unaligned(q):
    at = _append_snapshot_table(q, _snapshot_entry(q.l1_offset + 8, 1, "s1").ljust(64, b"\0"))
    q.put32(60, 1)
    q.put64(64, at)


def _mk_data_file(ctx, d, name):
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={name}.data",
         name + ".qcow2", "1M"], cwd=d)
    return [name + ".qcow2", name + ".data"]


# Tables (s4k: the damage is at guest 2M; 0, 4M and 6M stay intact).
G = 2 * MiB


def b_l2_unaligned(q):
    q.set_l2(G, q.l2(G) | 0x200)


def b_l2_beyond_eof(q):
    q.set_l2(G, 0x40000000 | COPIED)


def b_l2_just_past_eof(q):
    cs = q.cluster_size
    q.set_l2(G, ((len(q.b) + cs - 1) // cs * cs) | COPIED)


def b_l2_into_header(q):
    q.set_l2(G, COPIED)  # host offset 0 (the header cluster), flagged as allocated


def b_l2_into_l1(q):
    q.set_l2(G, q.l1_offset | COPIED)


def b_l2_into_rt(q):
    q.set_l2(G, q.rt_offset | COPIED)


def b_l2_into_refblock(q):
    q.set_l2(G, (q.rt(0) & OFFSET_MASK) | COPIED)


def b_l2_into_own_table(q):
    q.set_l2(G, q.l2_table(G) | COPIED)


def b_l2_reserved(q):
    q.set_l2(G, q.l2(G) | (1 << 56))


def b_l1_unaligned(q):
    q.set_l1(1, q.l1(1) | 0x200)


def b_l1_beyond_eof(q):
    q.set_l1(1, 0x40000000 | COPIED)


def b_l1_reserved(q):
    q.set_l1(1, q.l1(1) | (1 << 60))


def b_rt_entry_unaligned(q):
    q.set_rt(0, q.rt(0) | 0x200)


def b_rt_entry_beyond_eof(q):
    q.set_rt(0, 0x40000000)


def b_double_reference(q):
    # Guest 6M's entry now points at guest 0's cluster (refcount 1, COPIED set on both).
    q.set_l2(6 * MiB, q.host(0) | COPIED)


def b_compressed_past_eof(q):
    e = q.l2(MiB)
    x = 62 - (q.cluster_bits - 8)
    q.set_l2(MiB, (e & ~((1 << x) - 1)) | (1 << 34))


def b_compressed_garbage(q):
    off, _ = q.compressed(MiB)
    # Only the stream's first bytes: compressed clusters are packed, the next one may follow
    # a few bytes later.
    q.b[off:off + 4] = b"\xff" * 4


def b_ext_alloc_and_zero(q):
    q.set_l2_bitmap(MiB, 0xFFFFFFFF | (1 << 32))  # subcluster 0 allocated and zero


def b_ext_alloc_no_host(q):
    q.set_l2(MiB, 0)
    q.set_l2_bitmap(MiB, 0xFFFFFFFF)


def b_dirty_zeroed_refcount(q):
    q.set_refcount(q.host(MiB), 0)
    q.set_incompatible(INCOMPAT_DIRTY)


def b_dirty_rt_beyond_eof(q):
    q.set_rt(0, 0x40000000)
    q.set_incompatible(INCOMPAT_DIRTY)


# Chains.

def _outside(ctx):
    return os.path.join(ctx.root, "outside", "secret.img")


def _overlay(d, file, backing, fmt="raw", cluster_size=None):
    args = ["create", "-q", "-f", "qcow2", "-u", "-b", backing]
    if fmt:
        args += ["-F", fmt]
    if cluster_size:
        args += ["-o", f"cluster_size={cluster_size}"]
    qemu_img(*args, os.path.join(d, file), "1M")


def _mk_overlay_on(backing, fmt="raw"):
    def build(ctx, d, name):
        _overlay(d, name + ".qcow2", backing(ctx) if callable(backing) else backing, fmt)
        return [name + ".qcow2"]
    return build


def _mk_loop(ctx, d, name):
    _overlay(d, name + "_a.qcow2", name + "_b.qcow2", "qcow2")
    _overlay(d, name + "_b.qcow2", name + "_a.qcow2", "qcow2")
    return [name + "_a.qcow2", name + "_b.qcow2"]


def _mk_self_loop(ctx, d, name):
    _overlay(d, name + ".qcow2", name + ".qcow2", "qcow2")
    return [name + ".qcow2"]


def _mk_loop_below(ctx, d, name):
    # A root on top of a loop: the root is not part of the loop, so the scan sees it as a root.
    _overlay(d, name + ".qcow2", name + "_x.qcow2", "qcow2")
    _overlay(d, name + "_x.qcow2", name + "_y.qcow2", "qcow2")
    _overlay(d, name + "_y.qcow2", name + "_x.qcow2", "qcow2")
    return [name + ".qcow2", name + "_x.qcow2", name + "_y.qcow2"]


def _mk_deep(ctx, d, name, depth=100):
    # One qemu-img overlay with a placeholder backing name; the others are patched copies.
    files = [f"{name}{i:03d}.qcow2" for i in range(depth)]
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
             os.path.join(d, files[0]), "1M")
    tmpl = os.path.join(d, "deep.tmp")
    _overlay(d, "deep.tmp", "X" * len(files[0]), "qcow2", cluster_size=4096)
    q = Qcow2File(tmpl)
    at, size = q.u64(8), q.u32(16)
    for i in range(1, depth):
        q.b[at:at + size] = files[i - 1].encode()
        q.path = os.path.join(d, files[i])
        q.save()
    os.unlink(tmpl)
    return files


def _mk_symlink_out(ctx, d, name):
    os.symlink(_outside(ctx), os.path.join(d, name + "_link.img"))
    _overlay(d, name + ".qcow2", name + "_link.img")
    return [name + ".qcow2"]


def _mk_fifo_backing(ctx, d, name):
    # Opening a FIFO for reading waits for a writer: the scan must not.
    os.mkfifo(os.path.join(d, name + "_pipe.raw"))
    _overlay(d, name + ".qcow2", name + "_pipe.raw")
    return [name + ".qcow2"]


def _mk_link_loop(ctx, d, name):
    os.symlink(name + "_b.img", os.path.join(d, name + "_a.img"))
    os.symlink(name + "_a.img", os.path.join(d, name + "_b.img"))
    _overlay(d, name + ".qcow2", name + "_a.img")
    return [name + ".qcow2"]


def _mk_unrecorded_format(ctx, d, name):
    base = os.path.join(d, name + "_base.img")
    qemu_img("create", "-q", "-f", "raw", base, "1M")
    qemu_io(base, "write -P 0x77 64k 64k", fmt="raw")
    # A guest wrote a qcow2 header into its raw disk's first sector.
    fake = os.path.join(ctx.root, "fake.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "/etc/hostname", "-F", "raw", fake, "1M")
    with open(fake, "rb") as f:
        header = f.read(512)
    with open(base, "r+b") as f:
        f.write(header)
    top = name + ".qcow2"
    _overlay(d, top, name + "_base.img", "raw")
    q = Qcow2File(os.path.join(d, top))
    q.remove_ext(EXT_BACKING_FORMAT)  # the backing format is no longer recorded
    q.save()
    info = run(["qemu-img", "info", "-U", os.path.join(d, top)]).stdout
    assert "backing file format" not in info, info
    return [top, name + "_base.img"]


# ---------------------------------------------------------------------------------------------
# The table. Ranges are (offset, length) in the guest. `file` defaults to NAME.qcow2 and the
# export to NAME.raw; `files` (directory builders) lists what the case must not modify.

S64_OK = [(0, 64 * KiB), (2 * MiB, 64 * KiB), (3 * MiB, 64 * KiB)]
S4K_OK = [(0, 8 * KiB), (G + 4 * KiB, 4 * KiB), (4 * MiB, 8 * KiB), (6 * MiB, 4 * KiB)]
S4K_L1_OK = [(0, 8 * KiB), (4 * MiB, 8 * KiB), (6 * MiB, 4 * KiB)]
COMP_OK = [(0, 256 * KiB), (MiB + 64 * KiB, 64 * KiB), (2 * MiB, 64 * KiB), (3 * MiB, 64 * KiB)]
EXT_OK = [(0, 64 * KiB), (2 * MiB, 64 * KiB), (3 * MiB, 64 * KiB)]


PAST_EOF = ("beyond the end", "past the end", "beyond EOF", "past EOF")


def C(name, group, how, outcome, build, template=None, log=None, eio=(), ok=(), write=None,
      **extra):
    d = dict(name=name, group=group, how=how, outcome=outcome, build=build, template=template,
             log=log, eio=list(eio), ok=list(ok), write=write)
    d.update(extra)
    return d


def H(name, how, build, log, template="s64"):
    """A header case: refused with `log` (prefixed by the file name) in the daemon's log."""
    return C(name, "header", how, REFUSED, build, template, log=f"{name}.qcow2: {log}")


def T(name, how, build, problem, eio, ok=S4K_OK, write=None, template="s4k", **extra):
    """A table case: exported, the damage found (the log's corruption report says `problem`)
    and the image marked corrupt. `write` defaults to 4 KiB at the first damaged range."""
    if write is None:
        write = (eio[0][0], 4 * KiB)  # a write into the first damaged range
    return C(name, "tables", how, CORRUPT_ON_WRITE, build, template,
             log="corruption detected: ", problem=problem, eio=eio, ok=ok,
             write=write, **extra)


CASES = [
    # --- header ----------------------------------------------------------------------------
    H("version1", "version field (bytes 4..7) = 1", set_field(4, 1),
      "qcow2 version 1 is not supported"),
    H("version4", "version field = 4", set_field(4, 4), "qcow2 version 4 is not supported"),
    H("cbits8", "cluster_bits (20..23) = 8", set_field(20, 8), "cluster_bits 8 is out of range"),
    H("cbits22", "cluster_bits = 22", set_field(20, 22), "cluster_bits 22 is out of range"),
    H("hlen_unaligned", "header_length (100..103) = 108, not a multiple of 8",
      set_field(100, 108), "header_length 108 is invalid"),
    H("hlen_short", "header_length = 96 (< 104)", set_field(100, 96),
      "header_length 96 is invalid"),
    H("hlen_beyond", "header_length = 128 KiB (> the 64 KiB cluster)", set_field(100, 0x20000),
      "header_length 131072 is invalid"),
    H("backing_off_beyond", "backing_file_offset = 128 KiB (past the header cluster), size 8",
      b_backing_offset_beyond_cluster, "backing file name lies outside the header cluster"),
    H("backing_size_1024", "backing_file_size = 1024 (> 1023) at offset 4096",
      b_backing_size_1024, "backing file name (1024 bytes at 4096) is invalid"),
    H("ext_len_past", "feature name table extension length = cluster size (runs past it)",
      b_ext_len_past_cluster, "header extension 0x6803f857 (length 65536) runs past"),
    H("ext_unknown_huge", "end marker replaced by unknown extension 0x1a2b3c4d, length 0xfffffff0",
      b_ext_unknown_len_huge, "header extension 0x1a2b3c4d (length 4294967280) runs past"),
    H("incompat_bit40", "incompatible features bit 40 set, no feature table entry",
      set_field(72, 1 << 40, 8), "unknown incompatible feature(s): bit 40"),
    H("incompat_named", "incompatible bit 40 set, feature table entry names it",
      b_unknown_incompat_named, "unknown incompatible feature(s): imgfs-test-future-feature"),
    H("corrupt_bit", "incompatible features bit 1 (corrupt) set", set_field(72, 2, 8),
      "the image is marked corrupt and cannot be opened for writing"),
    H("rc_order7", "refcount_order (96..99) = 7", set_field(96, 7),
      "refcount_order 7 is out of range"),
    H("rt_unaligned", "refcount_table_offset (48..55) = 0x10008", set_field(48, 0x10008, 8),
      "refcount table offset 0x10008 is not cluster aligned"),
    H("rt_beyond_eof", "refcount_table_offset = 1 GiB (beyond EOF)", set_field(48, 1 << 30, 8),
      "refcount table (65536 bytes at 0x40000000) lies beyond the end of the file"),
    H("rt_clusters0", "refcount_table_clusters (56..59) = 0", set_field(56, 0),
      "refcount table size (0 clusters) is invalid"),
    H("rt_clusters_huge", "refcount_table_clusters = 0x00ffffff", set_field(56, 0xFFFFFF),
      "refcount table size (16777215 clusters) is invalid"),
    H("l1_too_small", "l1_size (36..39) = 0 for a 4 MiB disk", set_field(36, 0),
      "L1 table (0 entries) is too small for a virtual size of 4194304"),
    H("l1_huge", "l1_size = 5 Mi entries (40 MiB > 32 MiB)", set_field(36, 5 << 20),
      "L1 table of 5242880 entries is too large"),
    H("l1_unaligned", "l1_table_offset (40..47) = 0x30008", set_field(40, 0x30008, 8),
      "L1 table offset 0x30008 is not cluster aligned"),
    H("l1_beyond_eof", "l1_table_offset = 1 GiB", set_field(40, 1 << 30, 8),
      "L1 table (8 bytes at 0x40000000) lies beyond the end of the file"),
    H("size_huge", "virtual size (24..31) = 2^63", set_field(24, 1 << 63, 8),
      "L1 table (1 entries) is too small for a virtual size of 9223372036854775808"),
    H("nb_snap_huge", "nb_snapshots (60..63) = 0x7fffffff", b_nb_snapshots_huge,
      "2147483647 snapshots exceed the limit of 65536"),
    H("snap_beyond_eof", "nb_snapshots = 1, snapshots_offset = 0x7fff0000 (beyond EOF)",
      b_snapshot_beyond_eof, "snapshot table (40 bytes at 0x7fff0000) lies beyond the end"),
    H("snap_unaligned", "nb_snapshots = 1, snapshots_offset = 0x10008", b_snapshot_unaligned,
      "snapshot table offset 0x10008 is not cluster aligned"),
    H("snap_extra_huge", "a snapshot table (2 entries) whose first entry claims 0xfffffff0 "
      "bytes of extra data", b_snapshot_extra_huge,
      "snapshot table entry 0 runs past the table"),
    H("snap_l1_unaligned", "a snapshot whose L1 table offset is not cluster aligned",
      b_snapshot_l1_unaligned, "snapshot 's1' has an invalid L1 table (1 entries at 0x30008)"),
    H("crypt1", "crypt_method (32..35) = 1 (AES)", set_field(32, 1),
      "encrypted images are not supported (crypt_method 1)"),
    # (A real LUKS image would take qemu-img seconds of PBKDF benchmarking, which also fails
    # now and then on a loaded machine: the field is patched instead.)
    H("crypt2", "crypt_method = 2 (LUKS)", set_field(32, 2),
      "encrypted images are not supported (crypt_method 2)"),
    H("datafile_bit", "incompatible features bit 2 (external data file) set on a plain image",
      set_field(72, 1 << 2, 8), "images with an external data file are not supported"),
    C("datafile", "header", "qemu-img create -o data_file=datafile.data (incompat bit 2)",
      REFUSED, _mk_data_file,
      log="datafile.qcow2: images with an external data file are not supported"),

    # --- tables ----------------------------------------------------------------------------
    T("l1e_unaligned", "L1[1] (guest 2M..4M) |= 0x200", b_l1_unaligned,
      "L2 table offset", eio=[(G, 8 * KiB), (3 * MiB, 4 * KiB)], ok=S4K_L1_OK),
    T("l1e_beyond_eof", "L1[1] = 1 GiB | COPIED", b_l1_beyond_eof,
      "is beyond the end of the file", eio=[(G, 8 * KiB), (3 * MiB, 4 * KiB)], ok=S4K_L1_OK),
    T("l1e_reserved", "L1[1] |= bit 60 (reserved)", b_l1_reserved, "has reserved bits set",
      eio=[(G, 8 * KiB), (3 * MiB, 4 * KiB)], ok=S4K_L1_OK),
    T("l2e_unaligned", "L2 entry of guest 2M |= 0x200", b_l2_unaligned, "not cluster aligned",
      eio=[(G, 4 * KiB)]),
    T("l2e_beyond_eof", "L2 entry of guest 2M = 1 GiB | COPIED", b_l2_beyond_eof,
      PAST_EOF, eio=[(G, 4 * KiB)]),
    T("l2e_past_eof", "L2 entry of guest 2M = the first cluster past EOF | COPIED (the next "
      "allocation at the end would hand it out again)", b_l2_just_past_eof,
      PAST_EOF, eio=[(G, 4 * KiB)], crosstalk=True),
    T("l2e_header", "L2 entry of guest 2M = host 0 (the header) | COPIED", b_l2_into_header,
      "COPIED flag without a host cluster", eio=[(G, 4 * KiB)]),
    T("l2e_l1", "L2 entry of guest 2M = the L1 table's cluster", b_l2_into_l1,
      "would overlap metadata", eio=[(G, 4 * KiB)]),
    T("l2e_rt", "L2 entry of guest 2M = the refcount table's cluster", b_l2_into_rt,
      "would overlap metadata", eio=[(G, 4 * KiB)]),
    T("l2e_refblock", "L2 entry of guest 2M = the refcount block's cluster", b_l2_into_refblock,
      "would overlap metadata", eio=[(G, 4 * KiB)]),
    T("l2e_own_table", "L2 entry of guest 2M = its own L2 table's cluster", b_l2_into_own_table,
      "would overlap metadata", eio=[(G, 4 * KiB)]),
    T("l2e_reserved", "L2 entry of guest 2M |= bit 56 (reserved)", b_l2_reserved,
      "reserved bits set", eio=[(G, 4 * KiB)]),
    T("rte_unaligned", "refcount table[0] |= 0x200; reads are fine, an allocating write "
      "(guest 1M, unallocated) reaches it", b_rt_entry_unaligned,
      "refcount table entry 0", eio=[], ok=S4K_OK + [(G, 4 * KiB)], write=(MiB, 4 * KiB)),
    T("rte_beyond_eof", "refcount table[0] = 1 GiB; an allocating write reaches it",
      b_rt_entry_beyond_eof, "refcount table entry 0", eio=[], ok=S4K_OK + [(G, 4 * KiB)],
      write=(MiB, 4 * KiB)),
    T("double_ref", "L2 entry of guest 6M points at guest 0's cluster (refcount 1, both "
      "COPIED). Reads cannot tell (guest 6M reads guest 0's data, as qemu-img convert does), "
      "so no read is required to fail; a write to guest 6M must fail with EIO, never land in "
      "guest 0, and mark the image corrupt. (QEMU itself writes through here; only qemu-img "
      "check sees the double reference.)", b_double_reference, None, eio=[],
      ok=[(0, 8 * KiB), (G, 8 * KiB), (4 * MiB, 8 * KiB)], write=(6 * MiB, 4 * KiB),
      protect=(0, 4 * KiB)),
    T("comp_past_eof", "compressed descriptor of guest 1M: host offset = 16 GiB",
      b_compressed_past_eof, "starts beyond the end of the file", eio=[(MiB, 64 * KiB)],
      ok=COMP_OK, template="zlib"),
    C("comp_garbage_zlib", "tables", "first 4 bytes of guest 1M's zlib stream = 0xff",
      EIO_RANGE, b_compressed_garbage, "zlib", log="zlib: broken compressed cluster",
      eio=[(MiB, 64 * KiB), (MiB + 60 * KiB, 8 * KiB)], ok=COMP_OK),
    C("comp_garbage_zstd", "tables", "first 4 bytes of guest 1M's zstd frame = 0xff (bad magic)",
      EIO_RANGE, b_compressed_garbage, "zstd", log="zstd: broken compressed cluster",
      eio=[(MiB, 64 * KiB)], ok=COMP_OK),
    T("ext_alloc_zero", "extended L2, guest 1M: subcluster 0 both allocated and zero",
      b_ext_alloc_and_zero, "subcluster marked both allocated and zero",
      eio=[(MiB, 64 * KiB)], ok=EXT_OK, template="ext"),
    T("ext_alloc_nohost", "extended L2, guest 1M: host offset 0 with all subclusters allocated",
      b_ext_alloc_no_host, "allocated subclusters without a host cluster",
      eio=[(MiB, 64 * KiB)], ok=EXT_OK, template="ext"),
    C("dirty_zeroed_rc", "tables", "lazy_refcounts image, dirty bit set, refcount of guest 1M's "
      "data cluster zeroed. Degenerate EIO_RANGE: the repair on open removes the damage, so no "
      "range fails; a new allocation must not reuse the data cluster, and qemu-img check is "
      "clean afterwards", EIO_RANGE, b_dirty_zeroed_refcount, "lazy",
      log="dirty_zeroed_rc.qcow2: image is dirty (refcounts may be stale); repairing",
      ok=S64_OK + [(MiB, 64 * KiB)], repaired=True),
    C("dirty_rt_beyond", "tables", "lazy_refcounts image, dirty bit set, refcount table[0] = "
      "1 GiB (beyond EOF); repaired on open as above", EIO_RANGE, b_dirty_rt_beyond_eof, "lazy",
      log="dirty_rt_beyond.qcow2: refcounts rebuilt", ok=S64_OK + [(MiB, 64 * KiB)],
      repaired=True),

    # --- chains ----------------------------------------------------------------------------
    C("cycle", "chains", "cycle_a.qcow2 -> cycle_b.qcow2 -> cycle_a.qcow2", REFUSED, _mk_loop,
      log="loop", log_names=["cycle_a.qcow2", "cycle_b.qcow2"], exports=["cycle_a", "cycle_b"]),
    C("self_loop", "chains", "self_loop.qcow2 -> self_loop.qcow2", REFUSED, _mk_self_loop,
      log="loop", log_names=["self_loop.qcow2"]),
    C("loop_below", "chains", "loop_below -> loop_below_x -> loop_below_y -> loop_below_x",
      REFUSED, _mk_loop_below, log="loop",
      log_names=["loop_below.qcow2", "loop_below_x.qcow2", "loop_below_y.qcow2"],
      exports=["loop_below", "loop_below_x", "loop_below_y"]),
    C("deep", "chains", "deep099 -> deep098 -> ... -> deep000 (100 layers)", REFUSED, _mk_deep,
      log="backing chain of 'deep099.qcow2' is deeper than 64 layers",
      exports=[f"deep{i:03d}" for i in range(100)]),
    C("abs_out", "chains", "backing = absolute path of a file outside the directory", REFUSED,
      _mk_overlay_on(_outside), log="is outside the image directory",
      log_names=["abs_out.qcow2"]),
    C("dotdot", "chains", "backing = ../outside/secret.img", REFUSED,
      _mk_overlay_on("../outside/secret.img"),
      log="backing file '../outside/secret.img' escapes the image directory"),
    C("symlink_out", "chains", "backing = symlink_out_link.img, a symlink to a file outside",
      REFUSED, _mk_symlink_out, log="'symlink_out_link.img' resolves outside the image directory",
      exports=["symlink_out", "symlink_out_link"]),
    C("json", "chains", "backing = json:{\"file\":{\"driver\":\"file\",\"filename\":"
      "\"/etc/hostname\"}}", REFUSED,
      _mk_overlay_on('json:{"file":{"driver":"file","filename":"/etc/hostname"}}'),
      log="json.qcow2: json: backing file names are refused"),
    C("nbd", "chains", "backing = nbd://127.0.0.1:10809/x", REFUSED,
      _mk_overlay_on("nbd://127.0.0.1:10809/x"),
      log="protocol backing file names ('nbd://127.0.0.1:10809/x') are refused"),
    C("http", "chains", "backing = http://127.0.0.1/y.img", REFUSED,
      _mk_overlay_on("http://127.0.0.1/y.img"),
      log="protocol backing file names ('http://127.0.0.1/y.img') are refused"),
    C("unrecorded_fmt", "chains", "overlay on a raw file without recorded backing format, whose "
      "first sector holds a qcow2 header (backing format extension removed)", REFUSED,
      _mk_unrecorded_format, log="refusing to guess",
      exports=["unrecorded_fmt", "unrecorded_fmt_base"]),
    C("fifo", "chains", "backing = fifo_pipe.raw, a FIFO", REFUSED, _mk_fifo_backing,
      log="'fifo_pipe.raw' is not a regular file or block device"),
    C("link_loop", "chains", "backing = link_loop_a.img, a symlink to link_loop_b.img, which "
      "links back", REFUSED, _mk_link_loop, log="'link_loop_a.img' is a loop of symbolic links"),
    C("missing", "chains", "backing = missing_base.img, which does not exist", REFUSED,
      _mk_overlay_on("missing_base.img"), log="cannot open 'missing_base.img'"),
]

RESULTS = {}  # case name -> passed


# ---------------------------------------------------------------------------------------------
# Guarded operations: nothing may hang the test.

class Hang(AssertionError):
    pass


def guarded(fn, *args, timeout=OP_TIMEOUT):
    box = {}

    def body():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise Hang(f"{fn.__name__}{args} did not return within {timeout:.0f} s: the daemon hangs")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def pread(path, off, n):
    fd = os.open(path, os.O_RDONLY)
    try:
        out = b""
        while len(out) < n:
            chunk = os.pread(fd, n - len(out), off + len(out))
            if not chunk:
                break
            out += chunk
        return out
    finally:
        os.close(fd)


def pwrite(path, off, data):
    fd = os.open(path, os.O_RDWR)
    try:
        n = os.pwrite(fd, data, off)
        os.fsync(fd)
        return n
    finally:
        os.close(fd)


def listdir(path):
    return sorted(os.listdir(path))


def memory(pid):
    """(VmRSS, VmHWM) in bytes."""
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                vals[k] = int(v.split()[0]) * KiB
    return vals.get("VmRSS", 0), vals.get("VmHWM", 0)


# ---------------------------------------------------------------------------------------------

class Context:
    """Run-wide state: the root directory, templates and their original content."""

    def __init__(self, root):
        self.root = root
        self.templates = {}
        self.original = {}

    def template(self, key):
        if key not in self.templates:
            path = os.path.join(self.root, "templates", key + ".qcow2")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            TEMPLATES[key](path)
            self.templates[key] = path
            self.original[key] = convert_raw(path)
        return self.templates[key]


GOOD_WRITES = ["write -P 0x5a 0 512k", "write -P 0xa5 1M 64k"]


class Malformed(harness.ImageDirTest):
    ctx = None

    @classmethod
    def setUpClass(cls):
        cls.root_dir = tempfile.mkdtemp(prefix="imgfs-malformed-")
        cls.ctx = Context(cls.root_dir)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root_dir, ignore_errors=True)

    def setUp(self):
        super().setUp()  # skips (outside CI) or fails (in CI) without root, FUSE, qemu-img
        ctx = self.ctx
        outside = os.path.join(ctx.root, "outside")
        if not os.path.exists(outside):
            os.makedirs(outside)
            qemu_img("create", "-q", "-f", "raw", os.path.join(outside, "secret.img"), "1M")
        if not hasattr(ctx, "good"):
            path = os.path.join(ctx.root, "templates", "good.qcow2")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            qemu_img("create", "-q", "-f", "qcow2", path, "2M")
            qemu_io(path, *GOOD_WRITES)
            ctx.good = path
            ctx.good_data = convert_raw(path)

    def tearDown(self):
        # As ImageDirTest's, without its `losetup -D`: this file makes no loop devices, and
        # detaching every loop device would disturb other users of the machine.
        for m in self.mounts:
            self.stop(m)
            m.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- mount handling with timeouts ----

    def stop(self, m, force=False):
        """Unmounts (SIGKILLs the daemon first if `force`, or if the unmount does not work
        within bounded time); returns the daemon's exit code, or a string saying what went
        wrong."""
        if m.proc is None:
            return None
        code = "killed: the daemon hung" if force else None
        if not force and harness.is_mounted(m.mountpoint):
            deadline = time.time() + OP_TIMEOUT * 2
            while True:
                try:
                    p = run([harness.IMGFS, "unmount", m.mountpoint], check=False,
                            timeout=OP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    code = "imgfs unmount hung"
                    break
                if p.returncode == 0:
                    break
                if time.time() > deadline:
                    code = f"imgfs unmount failed: {p.stderr.strip()}"
                    break
                time.sleep(0.1)
        if code is not None and m.proc.poll() is None:
            m.proc.kill()  # aborts the FUSE connection: blocked requests return
        try:
            rc = m.proc.wait(timeout=OP_TIMEOUT * 2)
            code = rc if code is None else code
        except subprocess.TimeoutExpired:
            m.proc.kill()
            m.proc.wait()
            code = "the daemon did not exit after the unmount"
        m.log.close()
        m.proc = None
        if harness.is_mounted(m.mountpoint):
            run(["umount", "-l", m.mountpoint], check=False)
        return code

    # ---- building ----

    def build(self, group, cases):
        d = os.path.join(self.dir, group)
        os.makedirs(d)
        shutil.copyfile(self.ctx.good, os.path.join(d, "good.qcow2"))
        for c in cases:
            c.setdefault("file", c["name"] + ".qcow2")
            if c["template"] is not None:
                c["variants"] = [c["name"]]
                if c["outcome"] == CORRUPT_ON_WRITE:
                    c["variants"].append(c["name"] + "_r")  # see exercise()
                c["files"] = []
                for v in c["variants"]:
                    path = os.path.join(d, v + ".qcow2")
                    shutil.copyfile(self.ctx.template(c["template"]), path)
                    q = Qcow2File(path)
                    c["build"](q)
                    q.save()
                    c["files"].append(v + ".qcow2")
            else:
                c["files"] = c["build"](self.ctx, d, c["name"])
            c.setdefault("exports", [c["name"]])
        return d

    def snapshot_files(self, d, cases):
        shas = {}
        for c in cases:
            for f in c["files"]:
                shas[f] = sha256_file(os.path.join(d, f))
        shas["/outside"] = sha256_file(os.path.join(self.ctx.root, "outside", "secret.img"))
        return shas

    # ---- checks. Crashes and hangs fail at once; the rest is collected in `problems` so
    # that a failing case reports everything that is wrong with it. ----

    def assert_alive(self, m, state):
        if state.get("dead"):
            self.fail(f"the daemon is gone since an earlier case: {state['dead']}")
        if m.proc.poll() is not None:
            state["dead"] = f"exited with {m.proc.returncode}"
            self.fail(f"the daemon crashed (exit {m.proc.returncode}); log tail:\n"
                      f"{m.read_log()[-3000:]}")
        if not harness.is_mounted(m.mountpoint):
            state["dead"] = "mount gone"
            self.fail("the mount disappeared")

    def op(self, state, fn, *args):
        try:
            return guarded(fn, *args)
        except Hang:
            state["dead"] = "hung"
            raise

    def check_good(self, m, state, problems):
        try:
            got = self.op(state, pread, m.path("good.raw"), 0, len(self.ctx.good_data))
        except OSError as e:
            problems.append(f"good.raw fails: {e}")
            return
        if got != self.ctx.good_data:
            problems.append("good.raw no longer reads its content")

    def check_memory(self, m, problems):
        rss, hwm = memory(m.proc.pid)
        if hwm >= MEM_LIMIT:
            problems.append(f"daemon peak RSS {hwm >> 20} MiB (now {rss >> 20} MiB) exceeds "
                            f"{MEM_LIMIT >> 20} MiB")
        return hwm

    def check_reads_ok(self, state, c, path, problems, when):
        original = self.ctx.original[c["template"]]
        for off, n in c["ok"]:
            try:
                got = self.op(state, pread, path, off, n)
            except OSError as e:
                problems.append(f"{when}: undamaged range {off:#x}+{n:#x} fails: {e}")
                continue
            if got != original[off:off + n]:
                problems.append(f"{when}: undamaged range {off:#x}+{n:#x} differs from "
                                f"qemu-img convert of the original")

    def check_eio_reads(self, state, c, path, problems, tag):
        for off, n in c["eio"]:
            try:
                got = self.op(state, pread, path, off, n)
            except OSError as e:
                if e.errno != errno.EIO:
                    problems.append(f"{tag}damaged range {off:#x}+{n:#x}: {e} instead of EIO")
                continue
            what = "all zeros" if got == bytes(len(got)) else "data"
            problems.append(f"{tag}damaged range {off:#x}+{n:#x} read {len(got)} bytes "
                            f"({what}) instead of failing with EIO")

    @staticmethod
    def lines_about(log, c):
        stems = [f.rsplit(".", 1)[0] for f in c["files"]]
        lines = [l for l in log.splitlines() if any(s in l for s in stems)]
        return "the log lines about it:\n  " + "\n  ".join(lines) if lines else \
            "no log line mentions it"

    def check_refused(self, c, exports, log, problems):
        for e in c["exports"]:
            if e in exports:
                problems.append(f"{e}.raw is exported but must be refused")
        if c.get("log_names"):
            # One line names one of the case's files and, apart from the file names, the
            # problem (loop cases: the problem's word may be part of a file name).
            def names_problem(line):
                if not any(n in line for n in c["log_names"]):
                    return False
                for n in c["log_names"]:
                    line = line.replace(n, "")
                return c["log"] in line
            if not any(names_problem(line) for line in log.splitlines()):
                problems.append(f"no log line names {c['log_names']} and '{c['log']}'; "
                                f"{self.lines_about(log, c)}")
        elif c["log"] not in log:
            problems.append(f"the log does not say '{c['log']}'; {self.lines_about(log, c)}")

    def case_live(self, m, state, c, exports, problems):
        """The checks while mounted."""
        if c["outcome"] == REFUSED:
            self.check_refused(c, exports, m.read_log(), problems)
            return
        for variant in c["variants"]:
            if variant not in exports:
                problems.append(f"{variant}.raw is not exported; "
                                f"{self.lines_about(m.read_log(), c)}")
                continue
            self.exercise(m, state, c, variant, problems)

    def exercise(self, m, state, c, variant, problems):
        """Reads and writes NAME.raw. CORRUPT_ON_WRITE cases have two copies of the image:
        NAME, where a write hits the damage first (the write path must find it), and NAME_r,
        where reads do (the read path must find it)."""
        path = m.path(variant + ".raw")
        read_first = variant != c["name"]
        tag = f"{variant}.raw: "
        original = self.ctx.original[c["template"]]
        self.check_reads_ok(state, c, path, problems, tag + "before the damage is hit")
        if read_first:
            self.check_eio_reads(state, c, path, problems, tag)
        if c["outcome"] == CORRUPT_ON_WRITE:
            off, n = c["write"]
            try:
                self.op(state, pwrite, path, off, bytes([0xEE]) * n)
                problems.append(f"{tag}a write of {n} bytes at {off:#x}, reaching the damage, "
                                f"succeeded")
                wrote = True
            except OSError as e:
                if e.errno != errno.EIO:
                    problems.append(f"{tag}the write at {off:#x} failed with {e}, not EIO")
                wrote = False
            if c.get("protect"):
                p_off, p_n = c["protect"]
                got = self.op(state, pread, path, p_off, p_n)
                if got != original[p_off:p_off + p_n]:
                    problems.append(f"{tag}the write to guest {off:#x} changed guest "
                                    f"{p_off:#x}")
            if wrote and c.get("crosstalk"):
                # Where did it go? A fresh allocation elsewhere must not get the same cluster.
                self.op(state, pwrite, path, 7 * MiB, bytes([0xCC]) * n)
                if self.op(state, pread, path, off, n) == bytes([0xCC]) * n:
                    problems.append(f"{tag}a later write to guest 0x700000 (a fresh "
                                    f"allocation) showed up at guest {off:#x}: both map to "
                                    f"one host cluster")
        if not read_first:
            self.check_eio_reads(state, c, path, problems, tag)
        log = m.read_log()
        expect = f"{variant}.qcow2: {c['log']}" if c["outcome"] == CORRUPT_ON_WRITE else c["log"]
        at = log.find(expect) if expect else 0
        if at < 0:
            problems.append(f"{tag}the log does not say '{expect}'; "
                            f"{self.lines_about(log, c)}")
        elif c.get("problem"):
            # A tuple: any of these wordings (for detection imgfs does not have yet).
            wanted = c["problem"] if isinstance(c["problem"], tuple) else (c["problem"],)
            if not any(w in log[at:] for w in wanted):
                problems.append(f"{tag}the corruption report does not say "
                                f"{' or '.join(repr(w) for w in wanted)}")
        if c.get("repaired"):
            # A fresh allocation after the repair must not reuse the data cluster at guest 1M.
            fresh = 3 * MiB + 512 * KiB
            try:
                self.op(state, pwrite, path, fresh, bytes([0xDD]) * (64 * KiB))
                if self.op(state, pread, path, fresh, 64 * KiB) != bytes([0xDD]) * (64 * KiB):
                    problems.append(f"{tag}a write after the repair does not read back")
            except OSError as e:
                problems.append(f"{tag}a write after the repair fails: {e}")
        self.check_reads_ok(state, c, path, problems, tag + "after the damage was hit")

    def case_after(self, d, c, shas, problems):
        """The checks after the unmount."""
        if c["outcome"] == REFUSED:
            for f in c["files"]:
                if sha256_file(os.path.join(d, f)) != shas[f]:
                    problems.append(f"{f} was modified although it was refused")
            if sha256_file(os.path.join(self.ctx.root, "outside", "secret.img")) != \
                    shas["/outside"]:
                problems.append("a file outside the image directory was modified")
            return
        for variant in c["variants"]:
            path = os.path.join(d, variant + ".qcow2")
            if c["outcome"] == CORRUPT_ON_WRITE and not corrupt_bit_set(path):
                problems.append(f"{variant}.qcow2: the corrupt bit is not set in the file")
            if c["outcome"] == EIO_RANGE and corrupt_bit_set(path):
                problems.append(f"{variant}.qcow2: the corrupt bit was set")
        path = os.path.join(d, c["file"])
        if c.get("repaired"):
            if dirty_bit_set(path):
                problems.append("still dirty after the repair and a clean unmount")
            r = harness.check(path)
            if (r["corruptions"], r["check-errors"]) != (0, 0):
                problems.append(f"qemu-img check after the repair:\n{r['text']}")

    # ---- one directory ----

    def run_group(self, group):
        start = time.time()
        cases = [c for c in CASES if c["group"] == group]
        for c in cases:
            RESULTS[c["name"]] = False
        d = self.build(group, cases)
        shas = self.snapshot_files(d, cases)
        m = harness.Mount(d)
        self.mounts.append(m)
        m.start(timeout=max(60, OP_TIMEOUT * 2))
        state = {}
        exports = guarded(m.exports)
        self.assertIn("good", exports)
        live_ok = {}
        peak = 0
        for c in cases:
            live_ok[c["name"]] = False
            with self.subTest(case=c["name"], outcome=c["outcome"]):
                self.assert_alive(m, state)
                problems = []
                try:
                    self.case_live(m, state, c, exports, problems)
                finally:
                    # Whatever happened to the broken image: the daemon lives, its memory is
                    # bounded and the healthy image still serves.
                    if not state.get("dead"):
                        self.assert_alive(m, state)
                        self.check_good(m, state, problems)
                        peak = max(peak, self.check_memory(m, problems))
                if problems:
                    self.fail("\n" + "\n".join(problems))
                live_ok[c["name"]] = True
        with self.subTest(case=f"{group}: the healthy image is writable"):
            self.assert_alive(m, state)
            self.op(state, pwrite, m.path("good.raw"), 256 * KiB, b"\x3c" * 4096)
            self.assertEqual(self.op(state, pread, m.path("good.raw"), 256 * KiB, 4096),
                             b"\x3c" * 4096)
        code = self.stop(m, force=state.get("dead") == "hung")
        log = m.read_log()
        for c in cases:
            with self.subTest(case=c["name"], phase="after unmount"):
                self.assertEqual(code, 0, f"the daemon's exit: {code}; log tail:\n{log[-3000:]}")
                problems = []
                self.case_after(d, c, shas, problems)
                if problems:
                    self.fail("\n" + "\n".join(problems))
                RESULTS[c["name"]] = live_ok[c["name"]]
        r = harness.check(os.path.join(d, "good.qcow2"))
        self.assertEqual((r["corruptions"], r["leaks"], r["check-errors"]), (0, 0, 0), r["text"])
        print(f"\n  {group}: {len(cases)} cases in {time.time() - start:.1f} s, "
              f"daemon peak RSS {peak >> 20} MiB", file=sys.stderr)

    def test_header(self):
        self.run_group("header")

    def test_tables(self):
        self.run_group("tables")

    def test_chains(self):
        self.run_group("chains")


def summary():
    passed = sum(1 for v in RESULTS.values() if v)
    failed = sorted(k for k, v in RESULTS.items() if not v)
    lines = []
    if failed:
        lines.append(f"failed cases: {', '.join(failed)}")
    lines.append(f"malformed images: {len(RESULTS)} cases run, {passed} passed")
    return "\n".join(lines)


def print_table():
    for c in CASES:
        print(f"{c['name']:<18} {c['group']:<7} {c['outcome']:<17} {c['how']}")
        if c["outcome"] == REFUSED or c["outcome"] == EIO_RANGE:
            print(f"{'':<44} log: {c['log']}")
        else:
            p = c.get("problem") or ""
            p = " | ".join(p) if isinstance(p, tuple) else p
            print(f"{'':<44} log: {c['name']}.qcow2: {c['log']}... {p}")


if __name__ == "__main__":
    if "--table" in sys.argv[1:]:
        print_table()
        sys.exit(0)
    program = unittest.main(verbosity=2, exit=False)
    sys.stderr.flush()
    print(summary(), flush=True)
    sys.exit(0 if program.result.wasSuccessful() else 1)
