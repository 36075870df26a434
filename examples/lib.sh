# Sourced by the walkthroughs in this directory: where imgfs is, a work directory, step
# headings, and a cleanup that undoes what a walkthrough left mounted if it stops half way.
# Usage: . "$(dirname "$0")/lib.sh" NAME   (NAME names the work directory)
IMGFS=${IMGFS_BIN:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/build/imgfs}
# Installed (/usr/share/doc/imgfs/examples), there is no build beside it: the imgfs on PATH.
[ -x "$IMGFS" ] || IMGFS=$(command -v imgfs) || { echo "no imgfs: build it, or set IMGFS_BIN" >&2; exit 1; }
work=$(mktemp -d "/tmp/imgfs-$1.XXXXXX")
images=$work/images mnt=$work/mnt fs=$work/fs
mkdir -p "$images" "$mnt" "$fs"
loop= writer=
say() { printf '\n== %s\n' "$*"; }
cleanup() {
  fsfreeze -u "$fs" 2>/dev/null || true
  if [ -n "$writer" ]; then kill "$writer" 2>/dev/null; wait "$writer" 2>/dev/null || true; fi
  mountpoint -q "$fs" && umount "$fs" || true
  [ -n "$loop" ] && losetup -d "$loop" 2>/dev/null || true
  mountpoint -q "$mnt" && "$IMGFS" unmount "$mnt" || true
}
trap cleanup EXIT
