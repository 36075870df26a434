#!/usr/bin/env bash
# imgfs walkthrough: try, then keep or throw away. A snapshot before a risky change; the change
# is thrown away with `revert`, then made again and kept with `commit`, which merges the
# snapshot's overlay back while the filesystem stays mounted.
set -euo pipefail
. "$(dirname "$0")/lib.sh" try
attach() { loop=$(losetup -f --show "$mnt/vm.raw"); mount "$loop" "$fs"; }
detach() { umount "$fs"; losetup -d "$loop"; loop=; }

say "1. A VM disk with a filesystem and a file that matters"
"$IMGFS" create "$images/vm.qcow2" 128M
"$IMGFS" mount "$images" "$mnt"
loop=$(losetup -f --show "$mnt/vm.raw"); mkfs.ext4 -q "$loop"; losetup -d "$loop"; loop=
attach
echo "version 1" > "$fs/app.conf"
sync

say "2. Snapshot, then a risky change"
"$IMGFS" snapshot "$mnt" vm before-upgrade
echo "version 2 (broken)" > "$fs/app.conf"
dd if=/dev/urandom of="$fs/upgrade.bin" bs=1M count=8 status=none
sync
echo "the chain, top first:"; cat "$mnt/.control/vm/snapshot"
cat "$fs/app.conf"

say "3. Throw it away: revert drops the top layer (vm.raw must be closed for that)"
detach
"$IMGFS" revert "$mnt" vm
attach
cat "$fs/app.conf"
[ "$(cat "$fs/app.conf")" = "version 1" ] && [ ! -e "$fs/upgrade.bin" ]
echo "the chain, top first:"; cat "$mnt/.control/vm/snapshot"

say "4. Try again, and keep it: commit merges the overlay back while the filesystem is in use"
"$IMGFS" snapshot "$mnt" vm before-upgrade
echo "version 2" > "$fs/app.conf"
sync
"$IMGFS" commit "$mnt" vm --wait
echo "the chain, top first:"; cat "$mnt/.control/vm/snapshot"
[ "$(cat "$fs/app.conf")" = "version 2" ]

say "5. Unmount; qemu-img agrees"
detach
"$IMGFS" unmount "$mnt"
ls "$images"
qemu-img check "$images/vm.qcow2"
qemu-img convert -O raw "$images/vm.qcow2" "$work/check.raw"
echo "app.conf as QEMU reads it: $(debugfs -R 'cat /app.conf' "$work/check.raw" 2>/dev/null)"
[ "$(debugfs -R 'cat /app.conf' "$work/check.raw" 2>/dev/null)" = "version 2" ]

say "Done: vm.qcow2 holds version 2, and no snapshot file is left."
rm -rf "$work"
