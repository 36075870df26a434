#!/usr/bin/env bash
# imgfs walkthrough: offline work on a VM's disk. The disk has a partition table, as a guest's
# would; `losetup -P` shows its partitions, one is mounted, a file is fixed, and everything is
# put back. No NBD module, no QEMU process, no conversion.
set -euo pipefail
. "$(dirname "$0")/lib.sh" offline
attach_partitions() {  # losetup -P; partx for systems where the scan's nodes do not show
  loop=$(losetup -f --show -P "$1")
  [ -b "${loop}p2" ] || partx -a "$loop" 2>/dev/null || true
  for _ in $(seq 50); do [ -b "${loop}p2" ] && return; sleep 0.1; done
  echo "no partition devices appeared for $loop" >&2; exit 1
}

say "0. A guest's disk as QEMU made it: GPT, a small boot partition and a root partition"
qemu-img create -q -f qcow2 "$images/guest.qcow2" 256M
"$IMGFS" mount "$images" "$mnt"
printf 'label: gpt\nsize=32M, name=boot\nname=root\n' | sfdisk -q "$mnt/guest.raw"
attach_partitions "$mnt/guest.raw"
mkfs.ext4 -q -L root "${loop}p2"
mount "${loop}p2" "$fs"
mkdir -p "$fs/etc"
echo "PermitRootLogin yes" > "$fs/etc/sshd_config"   # the mistake to fix
umount "$fs"; losetup -d "$loop"; loop=
"$IMGFS" unmount "$mnt"

say "1. Mount the image directory; the disk is guest.raw"
"$IMGFS" mount "$images" "$mnt"
ls -l "$mnt"

say "2. Its partitions through a loop device"
attach_partitions "$mnt/guest.raw"
lsblk -o NAME,SIZE,LABEL,FSTYPE "$loop"

say "3. Mount the root partition, fix the file, unmount"
mount "${loop}p2" "$fs"
cat "$fs/etc/sshd_config"
echo "PermitRootLogin no" > "$fs/etc/sshd_config"
umount "$fs"
e2fsck -fn "${loop}p2" | tail -1
losetup -d "$loop"; loop=
"$IMGFS" unmount "$mnt"

say "4. QEMU sees the fix"
qemu-img check "$images/guest.qcow2"
qemu-img convert -O raw "$images/guest.qcow2" "$work/check.raw"
start=$(sfdisk --json "$work/check.raw" | python3 -c 'import json,sys; print(json.load(sys.stdin)["partitiontable"]["partitions"][1]["start"])')
fixed=$(debugfs -R 'cat /etc/sshd_config' "$work/check.raw?offset=$((start * 512))" 2>/dev/null || true)
if [ -z "$fixed" ]; then  # debugfs without offset= support: cut the partition out
  dd if="$work/check.raw" of="$work/root.raw" bs=512 skip="$start" status=none
  fixed=$(debugfs -R 'cat /etc/sshd_config' "$work/root.raw" 2>/dev/null)
fi
echo "sshd_config as QEMU reads it: $fixed"
[ "$fixed" = "PermitRootLogin no" ]

say "Done."
rm -rf "$work"
