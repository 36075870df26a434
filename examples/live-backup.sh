#!/usr/bin/env bash
# imgfs walkthrough: a live backup. A writer keeps changing a loop-mounted filesystem; a
# snapshot freezes the layer below it, which is then an ordinary qcow2 file to copy while the
# writer goes on; a commit merges the overlay back. The copy is checked against what the disk
# held at the moment of the snapshot.
set -euo pipefail
. "$(dirname "$0")/lib.sh" backup
backups=$work/backups
mkdir -p "$backups"

say "1. A database-like disk, loop-mounted, with a writer appending to it all the time"
"$IMGFS" create "$images/db.qcow2" 256M
"$IMGFS" mount "$images" "$mnt"
loop=$(losetup -f --show "$mnt/db.raw")
mkfs.ext4 -q "$loop"
mount "$loop" "$fs"
dd if=/dev/urandom of="$fs/table.bin" bs=1M count=32 status=none
( i=0; while :; do echo "record $i" >> "$fs/journal.log"; i=$((i + 1)); sleep 0.01; done ) &
writer=$!
sleep 1

say "2. Snapshot: db.qcow2 freezes, db@nightly.qcow2 takes the writes from now on"
# Frozen for the moment of the snapshot: the filesystem writes its journal out and is clean
# on the disk (a database would checkpoint first). The writer waits meanwhile.
fsfreeze -f "$fs"
"$IMGFS" snapshot "$mnt" db nightly
fsfreeze -u "$fs"
cat "$mnt/.control/db/snapshot"

say "3. Copy the frozen layer while the writer goes on"
cp --sparse=always "$images/db.qcow2" "$backups/db-$(date +%Y%m%d).qcow2"
sleep 1
echo "records written so far: $(wc -l < "$fs/journal.log")"
qemu-img check "$backups"/db-*.qcow2

say "4. Commit the overlay back, still live; the chain is one file again"
"$IMGFS" commit "$mnt" db --wait
cat "$mnt/.control/db/snapshot"

say "5. Stop the writer, unmount; the backup is a consistent filesystem"
kill "$writer"; wait "$writer" 2>/dev/null || true; writer=
live=$(wc -l < "$fs/journal.log")
umount "$fs"; losetup -d "$loop"; loop=
"$IMGFS" unmount "$mnt"
qemu-img check "$images/db.qcow2"
qemu-img convert -O raw "$backups"/db-*.qcow2 "$work/restored.raw"
e2fsck -fn "$work/restored.raw" | tail -1
saved=$(debugfs -R 'cat /journal.log' "$work/restored.raw" 2>/dev/null | wc -l)
echo "the backup holds $saved records, the live disk $live"
[ "$saved" -gt 0 ] && [ "$saved" -le "$live" ]

say "Done: the backup restores on its own (qemu-img convert, or use it as a backing file)."
rm -rf "$work"
