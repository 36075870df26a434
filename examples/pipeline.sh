#!/usr/bin/env bash
# imgfs walkthrough: an image pipeline. A golden base image, one overlay per machine on top of
# it in the same directory, each machine's disk changed on its own; then one overlay is
# flattened with `stream` into a standalone image that no longer needs the base.
set -euo pipefail
. "$(dirname "$0")/lib.sh" pipeline
attach() { loop=$(losetup -f --show "$mnt/$1.raw"); mount "$loop" "$fs"; }
detach() { umount "$fs"; losetup -d "$loop"; loop=; }
fs_cat() {  # FILE.qcow2 PATH: a file of the image's filesystem, read through QEMU's reading
  qemu-img convert -O raw "$images/$1" "$work/read.raw"
  debugfs -R "cat $2" "$work/read.raw" 2>/dev/null
  rm -f "$work/read.raw"
}

say "1. The golden image: a filesystem with what every machine shares"
"$IMGFS" create "$images/golden.qcow2" 256M
"$IMGFS" mount "$images" "$mnt"
loop=$(losetup -f --show "$mnt/golden.raw"); mkfs.ext4 -q -L golden "$loop"; losetup -d "$loop"
attach golden
echo "golden release 12" > "$fs/release"
dd if=/dev/urandom of="$fs/packages.img" bs=1M count=24 status=none
detach
"$IMGFS" unmount "$mnt"

say "2. One overlay per machine on the same base (made offline, as qemu-img create -b would)"
for vm in web db; do "$IMGFS" create -b golden.qcow2 -F qcow2 "$images/$vm.qcow2"; done
"$IMGFS" mount "$images" "$mnt"
ls "$mnt"   # golden.qcow2 is now a layer under both, not an image of its own
for vm in web db; do
  attach "$vm"
  echo "$vm" > "$fs/hostname"
  detach
done
du -h --apparent-size "$images"/*.qcow2

say "3. Flatten db into a standalone image while it is in use: stream copies the base's data up"
attach db
"$IMGFS" stream "$mnt" db --wait
echo "the chain, top first:"; cat "$mnt/.control/db/snapshot"
detach
"$IMGFS" unmount "$mnt"

say "4. QEMU's view: db.qcow2 has no backing file, web.qcow2 still uses the base"
for f in golden web db; do qemu-img check -q "$images/$f.qcow2"; done
qemu-img info "$images/db.qcow2" | grep -q "^backing file" && { echo "db still has a backing file"; exit 1; }
qemu-img info "$images/web.qcow2" | grep "^backing file"
echo "db:  $(fs_cat db.qcow2 /hostname), $(fs_cat db.qcow2 /release)"
echo "web: $(fs_cat web.qcow2 /hostname), $(fs_cat web.qcow2 /release)"
[ "$(fs_cat db.qcow2 /hostname)" = db ] && [ "$(fs_cat db.qcow2 /release)" = "golden release 12" ]

say "Done: db.qcow2 can be copied anywhere on its own; web.qcow2 and golden.qcow2 go together."
rm -rf "$work"
