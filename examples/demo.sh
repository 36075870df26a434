#!/usr/bin/env bash
# imgfs demo: an image directory served as raw files, a filesystem made on one of them through a
# loop device, then everything unmounted and checked with qemu-img.
set -euo pipefail
. "$(dirname "$0")/lib.sh" demo

say "1. An image directory: a base image and a VM disk on top of it"
"$IMGFS" create "$images/base.qcow2" 256M
"$IMGFS" create -b base.qcow2 "$images/vm1.qcow2"
qemu-img create -q -f raw "$images/scratch.img" 64M
ls -l "$images"

say "2. Mount it: every chain appears as NAME.raw (base.qcow2 is a layer, not an export)"
"$IMGFS" mount "$images" "$mnt"
ls -l "$mnt"
echo "info:"; cat "$mnt/.control/vm1/info"; echo

say "3. Loop-mount vm1.raw, make ext4 on it and write some files"
loop=$(losetup -f --show "$mnt/vm1.raw")
mkfs.ext4 -q "$loop"
mount "$loop" "$fs"
cp -r /etc/default "$fs/etc-default" 2>/dev/null || true
seq 1 100000 > "$fs/numbers.txt"
dd if=/dev/urandom of="$fs/random.bin" bs=1M count=16 status=none
sha256sum "$fs/numbers.txt" "$fs/random.bin" | tee "$work/sums"
df -h "$fs" | tail -1

say "4. Live snapshot while the filesystem stays mounted: vm1@demo.qcow2 becomes the top layer"
sync
"$IMGFS" snapshot "$mnt" vm1 demo
echo "more data after the snapshot" > "$fs/after-snapshot.txt"
echo "the chain, top first:"; cat "$mnt/.control/vm1/snapshot"
"$IMGFS" status "$mnt" vm1

say "5. Unmount everything"
umount "$fs"
losetup -d "$loop"; loop=
e2fsck -fn "$mnt/vm1.raw" | tail -1
"$IMGFS" unmount "$mnt"

say "6. qemu-img check and info on what imgfs wrote"
qemu-img check "$images/vm1.qcow2"
qemu-img check "$images/vm1@demo.qcow2"
qemu-img info --backing-chain "$images/vm1@demo.qcow2" | grep -E "^image|^backing file:"

say "Done. The filesystem lives in vm1.qcow2 and vm1@demo.qcow2 (base.qcow2 is untouched)."
echo "Everything is in $work (remove it with: rm -rf $work)"
