#!/usr/bin/env bash
# Seed corpus for the libFuzzer targets, made by qemu-img and qemu-io (the reference
# implementation), so the fuzzers start from images that exercise every feature we parse:
#
#   OUT/fuzz_image/NAME   whole images (each under 1 MiB: small virtual sizes)
#   OUT/fuzz_header/NAME  their first cluster (at most 64 KiB); images with a snapshot table
#                         whole, so the snapshot table parser gets real input too
#   OUT/fuzz_l2/NAME      one L2 table of each image, behind the geometry byte fuzz_l2 expects
#
# Usage: tests/fuzz/make_corpus.sh OUT   (needs qemu-img and qemu-io; installs nothing)
set -euo pipefail
out=${1:?usage: make_corpus.sh OUT}
for tool in qemu-img qemu-io od dd; do
  command -v "$tool" >/dev/null || { echo "make_corpus: $tool is missing" >&2; exit 1; }
done
mkdir -p "$out/fuzz_image" "$out/fuzz_header" "$out/fuzz_l2"
out=$(cd "$out" && pwd)  # the images are made in a temporary directory
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

max_image_bytes=$((1024 * 1024))

create() {  # create NAME SIZE [-o opts...]: a qcow2 image in the work directory
  local name=$1 size=$2
  shift 2
  qemu-img create -q -f qcow2 "$@" "$name.qcow2" "$size"
}

io() {  # io NAME 'cmd' ['cmd'...]: qemu-io commands on an image
  local name=$1
  shift
  local args=()
  for c in "$@"; do
    args+=(-c "$c")
  done
  qemu-io -f qcow2 "${args[@]}" "$name.qcow2" >/dev/null
}

be64() {  # be64 FILE OFFSET: the big-endian 64-bit value at OFFSET, in decimal
  local hex
  hex=$(od -An -tx1 -j "$2" -N 8 "$1" | tr -d ' \n')
  echo $((16#${hex:-0}))
}
be32() {
  local hex
  hex=$(od -An -tx1 -j "$2" -N 4 "$1" | tr -d ' \n')
  echo $((16#${hex:-0}))
}

# ---- the images ----

# Version 2 (compat=0.10): no feature bits, no header length, zero clusters impossible.
create v2_64k 4M -o compat=0.10
io v2_64k 'write -P 0x11 0 100k' 'write -P 0x22 1M 4k' 'write -P 0x23 3M 70k'

# Version 3, default 64 KiB clusters: data, a zero cluster, a discarded cluster.
create v3_64k 4M -o compat=1.1
io v3_64k 'write -P 0x31 0 130k' 'write -z 192k 64k' 'write -P 0x32 2M 64k' \
  'discard 2M 64k' 'write -P 0x33 3M 1k'

# 512-byte clusters: an L2 table maps only 32 KiB, so even a small image has many tables.
create v3_512 1M -o cluster_size=512
io v3_512 'write -P 0x41 0 40k' 'write -P 0x42 100k 1k' 'write -z 200k 8k' 'discard 10k 2k' \
  'write -P 0x43 700k 3k'
create v2_512 512k -o compat=0.10,cluster_size=512
io v2_512 'write -P 0x44 0 5k' 'write -P 0x45 300k 1k'

# 4 KiB clusters, the smallest common size.
create v3_4k 2M -o cluster_size=4k
io v3_4k 'write -P 0x51 0 9k' 'write -z 64k 16k' 'write -P 0x52 1M 5k'

# Extended L2 entries: 32 subclusters per cluster, partial writes leave mixed bitmaps.
create extl2_16k 2M -o extended_l2=on,cluster_size=16k
io extl2_16k 'write -P 0x61 0 1k' 'write -P 0x62 17k 3k' 'write -z 40k 4k' \
  'write -P 0x63 64k 16k' 'discard 66k 2k' 'write -z 1M 16k'
create extl2_64k 2M -o extended_l2=on
io extl2_64k 'write -P 0x64 4k 2k' 'write -P 0x65 70k 10k' 'write -z 200k 8k'

# Compressed clusters (zlib, the default, and zstd), from compressible but varied data.
seq 1 40000 >text.txt
head -c 196608 text.txt >text.raw
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4k text.raw zlib_4k.qcow2
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4k,compression_type=zstd text.raw \
  zstd_4k.qcow2
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=64k,compression_type=zstd text.raw \
  zstd_64k.qcow2
# A compressed image written to afterwards: overwrites of compressed clusters.
cp zlib_4k.qcow2 zlib_rewritten.qcow2
io zlib_rewritten 'write -P 0x71 4k 1k' 'write -z 16k 4k' 'discard 32k 4k'
# Compressed clusters with extended L2.
create extl2_zlib 1M -o extended_l2=on,cluster_size=16k
io extl2_zlib 'write -c -P 0x72 0 16k' 'write -c -P 0x73 32k 16k' 'write -P 0x74 48k 1k'

# Refcount widths at both ends.
create refcount1 1M -o cluster_size=512,refcount_bits=1
io refcount1 'write -P 0x81 0 20k' 'write -P 0x82 500k 1k'
create refcount64 1M -o cluster_size=512,refcount_bits=64
io refcount64 'write -P 0x83 0 20k' 'write -P 0x84 500k 1k'
create refcount8 1M -o cluster_size=4k,refcount_bits=8
io refcount8 'write -P 0x85 0 20k'

# A backing file recorded (raw and qcow2), with the backing format extension.
qemu-img create -q -f raw base.raw 1M
create overlay_raw 1M -b base.raw -F raw
io overlay_raw 'write -P 0x91 0 4k' 'write -z 64k 64k' 'discard 128k 64k'
create base_q 1M -o cluster_size=4k
io base_q 'write -P 0x92 0 64k'
create overlay_q 1M -o cluster_size=4k -b base_q.qcow2 -F qcow2
io overlay_q 'write -P 0x93 1k 2k' 'write -z 16k 8k'
create overlay_v2 1M -o compat=0.10,cluster_size=4k -b base_q.qcow2 -F qcow2
io overlay_v2 'write -P 0x94 1k 2k'
create overlay_extl2 1M -o extended_l2=on,cluster_size=16k -b base.raw -F raw
io overlay_extl2 'write -P 0x95 1k 2k' 'write -z 40k 1k'

# Lazy refcounts, left dirty by a crash (qemu-io's abort), and the same closed cleanly.
create lazy_clean 1M -o cluster_size=4k,lazy_refcounts=on
io lazy_clean 'write -P 0xa1 0 12k'
create lazy_dirty 1M -o cluster_size=4k,lazy_refcounts=on
(
  ulimit -c 0
  qemu-io -f qcow2 -c 'write -P 0xa2 0 12k' -c 'write -P 0xa3 512k 4k' -c abort \
    lazy_dirty.qcow2 >/dev/null 2>&1 || true
) 2>/dev/null  # the shell's own "Aborted" report
if [ $(($(be64 lazy_dirty.qcow2 72) & 1)) != 1 ]; then
  echo "make_corpus: lazy_dirty.qcow2 is not dirty after the abort" >&2
  exit 1
fi

# Internal snapshots: shared clusters (refcount 2), a shared L2 table, copies after it.
create snapshot 1M -o cluster_size=4k
io snapshot 'write -P 0xb1 0 16k'
qemu-img snapshot -c first snapshot.qcow2
io snapshot 'write -P 0xb2 4k 4k'
qemu-img snapshot -c second snapshot.qcow2
io snapshot 'write -P 0xb3 512k 8k'
create snapshot_512 256k -o cluster_size=512
io snapshot_512 'write -P 0xb4 0 4k'
qemu-img snapshot -c only snapshot_512.qcow2
io snapshot_512 'write -P 0xb5 1k 1k'

# A persistent dirty bitmap: the bitmaps extension and an autoclear bit.
create bitmap 1M -o cluster_size=4k
qemu-img bitmap -q --add bitmap.qcow2 b0 2>/dev/null || qemu-img bitmap --add bitmap.qcow2 b0
io bitmap 'write -P 0xc1 0 8k'

# Preallocated metadata: zero clusters with host clusters (v3), data offsets (v2).
create prealloc 256k -o cluster_size=4k,preallocation=metadata
io prealloc 'write -P 0xd1 8k 4k'
create prealloc_v2 128k -o compat=0.10,cluster_size=4k,preallocation=metadata

# Bits we refuse or handle specially: the corrupt bit, an external data file.
cp v3_4k.qcow2 corrupt_bit.qcow2
printf '\x02' | dd of=corrupt_bit.qcow2 bs=1 seek=79 conv=notrunc status=none
qemu-img create -q -f qcow2 -o data_file=data.raw,cluster_size=4k data_file.qcow2 1M
# A large virtual size with 2 MiB clusters (header only: the file itself is several MiB).
qemu-img create -q -f qcow2 -o cluster_size=2M big_cluster.qcow2 1T
# A 64-bit-ish virtual size with small clusters: a big L1 table in a small file.
qemu-img create -q -f qcow2 -o cluster_size=64k huge_virtual.qcow2 8T

# ---- the seeds ----

count=0
for img in *.qcow2; do
  name=${img%.qcow2}
  size=$(stat -c %s "$img")
  cluster=$((1 << $(be32 "$img" 20)))
  if [ "$size" -le "$max_image_bytes" ] && [ "$name" != data_file ]; then
    cp "$img" "$out/fuzz_image/$name"
  fi
  if [ "$(be32 "$img" 60)" != 0 ] && [ "$size" -le "$max_image_bytes" ]; then
    cp "$img" "$out/fuzz_header/$name"  # snapshot table included
  else
    head_bytes=$((cluster < 65536 ? cluster : 65536))
    head -c "$head_bytes" "$img" >"$out/fuzz_header/$name"
  fi
  # fuzz_l2: geometry byte (cluster_bits - 9, bit 7: extended L2), then the first L2 table
  # the L1 table points at (at most 4 KiB of it).
  l1_offset=$(be64 "$img" 40)
  l1_size=$(be32 "$img" 36)
  incompat=0
  [ "$(be32 "$img" 4)" = 3 ] && incompat=$(be64 "$img" 72)
  for ((i = 0; i < l1_size && i < 64; i++)); do
    l2=$(($(be64 "$img" $((l1_offset + i * 8))) & 0x00fffffffffffe00))
    if [ "$l2" != 0 ] && [ $((l2 + cluster)) -le "$size" ]; then
      geom=$(($(be32 "$img" 20) - 9))
      [ $((incompat & 16)) != 0 ] && geom=$((geom | 128))
      {
        printf "\\x$(printf %02x "$geom")"
        dd if="$img" bs=512 skip=$((l2 / 512)) count=$(((cluster < 4096 ? cluster : 4096) / 512)) \
          status=none
      } >"$out/fuzz_l2/$name"
      break
    fi
  done
  count=$((count + 1))
done
echo "make_corpus: $count images -> $out ($(ls "$out/fuzz_image" | wc -l) image seeds," \
  "$(ls "$out/fuzz_header" | wc -l) header seeds, $(ls "$out/fuzz_l2" | wc -l) L2 seeds)"
