#!/usr/bin/env bash
# The package stage: builds the Debian package with cpack from a build tree (by default the
# build/ that scripts/test.sh made, so nothing is compiled again), checks what it holds, then
# installs it with apt-get and runs, against the INSTALLED files with the build tree out of
# PATH: imgfs --version, man imgfs, the demo (examples/demo.sh), mounts through mount(8) with
# -t fuse.imgfs and with an fstab line (mount -T), the commands of imgfs@.service, bash
# completion. Removes the package at the end.
#
# Installing into the system needs root, apt-get and /dev/fuse. In CI (CI set) it always runs
# and a missing piece is a failure; elsewhere the install part runs only with
# IMGFS_PACKAGE_INSTALL=1 (it installs and then removes the imgfs package) and otherwise says
# that it is skipped. IMGFS_PACKAGE_CHROOT=1 also installs it in a fresh Debian 12 chroot
# (debootstrap; not in CI, for time).
# Usage: scripts/package_test.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
src=$PWD
dir=${1:-build}
t0=$(date +%s)
say() { printf 'package: %s\n' "$*"; }
die() {
  printf 'package: FAILED: %s\n' "$*" >&2
  exit 1
}

bash scripts/deps.sh
if [ ! -f "$dir/CMakeCache.txt" ]; then
  bash scripts/build.sh "$dir" -DIMGFS_WERROR=ON
else
  cmake --build "$dir" -j"$(nproc)" >"/tmp/imgfs-package-build.$$.log" 2>&1 ||
    { tail -40 "/tmp/imgfs-package-build.$$.log"; die "cmake --build $dir failed"; }
  rm -f "/tmp/imgfs-package-build.$$.log"
fi
dir=$(cd "$dir" && pwd)
work=$(mktemp -d /tmp/imgfs-package.XXXXXX)
installed=0
cleanup() {
  local m
  for m in "$work"/mnt*; do
    if mountpoint -q "$m" 2>/dev/null; then umount "$m" 2>/dev/null || true; fi
  done
  if [ "$installed" = 1 ]; then
    say "removing the package (cleanup)"
    DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq imgfs >/dev/null 2>&1 || true
  fi
  for m in "$work/chroot/mnt/d" "$work/chroot/dev" "$work/chroot/proc"; do
    if mountpoint -q "$m" 2>/dev/null; then umount -l "$m" || true; fi
  done
  # Never into a mount (the chroot's /dev is the host's).
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

# ---- 1. The package and what it holds.
say "building the package (cpack -G DEB, from $dir)"
(cd "$work" && cpack -G DEB --config "$dir/CPackConfig.cmake" -B "$work/pkg" >"$work/cpack.log" 2>&1) ||
  { cat "$work/cpack.log"; die "cpack failed"; }
debs=("$work"/pkg/imgfs_*.deb)
if [ ${#debs[@]} != 1 ] || [ ! -f "${debs[0]}" ]; then
  die "expected one imgfs_*.deb, got: ${debs[*]}"
fi
deb=${debs[0]}
say "built $(basename "$deb") ($(du -k "$deb" | cut -f1) KiB)"
version=$(dpkg-deb -f "$deb" Version)
depends=$(dpkg-deb -f "$deb" Depends)
say "Depends: $depends"
for lib in libfuse3-3 liburing2 libzstd1 zlib1g libfmt9 libstdc++6 libc6 fuse3; do
  [[ ", $depends" == *", $lib"* ]] || die "Depends lacks $lib"
done
recommends=$(dpkg-deb -f "$deb" Recommends)
say "Recommends: $recommends"
for lib in librados2 librbd1; do
  [[ ", $recommends" == *", $lib"* ]] || die "Recommends lacks $lib (Ceph pools need it)"
done
dpkg-deb -c "$deb" | awk '{ print $6 $7 $8 }' | sed 's#^\./#/#' >"$work/contents"
for f in /usr/bin/imgfs /usr/sbin/mount.fuse.imgfs '->../bin/imgfs' /usr/sbin/mount.imgfs \
  /usr/share/man/man1/imgfs.1.gz /usr/share/man/man1/imgfs-mount.1.gz \
  /usr/share/man/man8/mount.imgfs.8.gz /usr/share/man/man8/mount.fuse.imgfs.8.gz \
  /usr/share/bash-completion/completions/imgfs /usr/lib/systemd/system/imgfs@.service; do
  grep -qF -- "$f" "$work/contents" || die "the package lacks $f"
done
# One man page per command that imgfs --help lists.
for c in $("$dir/imgfs" --help | awk '/^  [a-z]/ { print $1 }' | sort -u); do
  grep -qF "/usr/share/man/man1/imgfs-$c.1.gz" "$work/contents" || die "no man page for imgfs $c"
done
say "package contents: ok"

# ---- 2. cmake --install with the default prefix, staged (DESTDIR).
DESTDIR="$work/stage" cmake --install "$dir" >/dev/null
for f in usr/local/bin/imgfs usr/local/share/man/man1/imgfs.1.gz \
  usr/local/share/bash-completion/completions/imgfs usr/local/lib/systemd/system/imgfs@.service; do
  [ -e "$work/stage/$f" ] || die "cmake --install: no $f"
done
[ "$(readlink "$work/stage/sbin/mount.fuse.imgfs")" = /usr/local/bin/imgfs ] ||
  die "cmake --install: /sbin/mount.fuse.imgfs should link to /usr/local/bin/imgfs"
grep -q '^ExecStart=/usr/local/bin/imgfs mount' "$work/stage/usr/local/lib/systemd/system/imgfs@.service" ||
  die "cmake --install: imgfs@.service does not run /usr/local/bin/imgfs"
say "cmake --install (prefix /usr/local, DESTDIR): ok"

# ---- 3. Install it and use the installed files.
why=
if [ "$(id -u)" -ne 0 ]; then
  why="not root"
elif ! command -v apt-get >/dev/null; then
  why="no apt-get"
elif [ ! -c /dev/fuse ]; then
  why="no /dev/fuse"
elif [ -z "${CI:-}" ] && [ "${IMGFS_PACKAGE_INSTALL:-0}" != 1 ]; then
  why="outside CI the package is installed only with IMGFS_PACKAGE_INSTALL=1"
fi
if [ -n "$why" ]; then
  [ -z "${CI:-}" ] || die "cannot install the package in CI: $why"
  say "SKIPPED installing the package and the tests of the installed files: $why"
  say "passed (package built and checked) in $(($(date +%s) - t0)) s"
  exit 0
fi
if dpkg-query -W -f='${Status}' imgfs 2>/dev/null | grep -q "install ok installed"; then
  die "an imgfs package is installed already; remove it first (apt-get purge imgfs)"
fi
[ ! -e /usr/local/bin/imgfs ] || die "/usr/local/bin/imgfs exists and would shadow the package"

say "apt-get install $deb"
installed=1
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$deb" >"$work/apt.log" 2>&1 ||
  { cat "$work/apt.log"; die "apt-get install failed"; }
# From here on only the installed files: no build tree in PATH, no IMGFS_BIN.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset IMGFS_BIN
cd "$work"
[ "$(command -v imgfs)" = /usr/bin/imgfs ] || die "imgfs in PATH is $(command -v imgfs), not /usr/bin/imgfs"

out=$(imgfs --version)
[ "$out" = "imgfs $version" ] || die "imgfs --version says '$out', the package is $version"
say "imgfs --version: $out"

man -w imgfs >/dev/null || die "man cannot find imgfs(1)"
MANWIDTH=100 man imgfs 2>"$work/man.err" >"$work/man.txt" || true
grep -q "^IMGFS(1)" "$work/man.txt" || { cat "$work/man.err"; die "man imgfs shows no page"; }
for c in $(imgfs --help | awk '/^  [a-z]/ { print $1 }' | sort -u); do
  grep -qE "^ +imgfs $c( |$)" "$work/man.txt" || die "man imgfs does not describe 'imgfs $c'"
  man -w "imgfs-$c" >/dev/null || die "man cannot find imgfs-$c(1)"
done
MANWIDTH=100 man mount.fuse.imgfs 2>/dev/null | grep -q "^MOUNT.IMGFS(8)" ||
  die "man mount.fuse.imgfs shows no page"
say "man imgfs: $(wc -l <"$work/man.txt") lines, every command described; imgfs-COMMAND(1), mount.imgfs(8): ok"

say "the installed demo (/usr/share/doc/imgfs/examples) against /usr/bin/imgfs"
for f in "$src"/examples/*.sh; do
  [ -x "/usr/share/doc/imgfs/examples/$(basename "$f")" ] || die "$(basename "$f") is not installed"
done
env -u IMGFS_BIN bash /usr/share/doc/imgfs/examples/demo.sh >"$work/demo.log" 2>&1 ||
  { cat "$work/demo.log"; die "the demo failed against the installed binary"; }
demo_dir=$(sed -n 's/^Everything is in \(.*\) (remove it.*/\1/p' "$work/demo.log")
tail -3 "$work/demo.log" | sed 's/^/  /'
[ -n "$demo_dir" ] && rm -rf "$demo_dir"
say "demo: ok"

# mount(8) finds /sbin/mount.fuse.imgfs by itself: run it with an empty environment (no PATH).
images="$work/images"
mkdir -p "$images" "$work/mnt1" "$work/mnt 2"
imgfs create "$images/vm1.qcow2" 64M >/dev/null
imgfs io "$images/vm1.qcow2" -c 'write -P 0x5a 0 1M' >/dev/null
fstype() { findmnt -n -o FSTYPE --mountpoint "$1"; }
wait_gone() { # the daemon of a mount that umount(8) detached exits once the images are closed
  local _  # (the daemon's command line is mount(8)'s: /sbin/mount.fuse.imgfs SRC MNT -o ...)
  for _ in $(seq 1 100); do
    pgrep -f -- "imgfs.* $1( |\$)" >/dev/null || return 0
    sleep 0.1
  done
  die "the daemon for $1 did not exit after umount"
}

say "mount -t fuse.imgfs -o ro (no PATH)"
env -i /bin/mount -t fuse.imgfs -o ro "$images" "$work/mnt1" || die "mount -t fuse.imgfs failed"
[ "$(fstype "$work/mnt1")" = fuse.imgfs ] || die "no fuse.imgfs mount on mnt1"
cmp -n 1048576 "$work/mnt1/vm1.raw" <(head -c 1048576 /dev/zero | tr '\0' '\132') ||
  die "vm1.raw does not read back what imgfs io wrote"
# `ro` reaches the daemon, which refuses every change itself with EROFS (the kernel mount
# stays read-write so that a rescan can be written).
if out=$(dd if=/dev/zero of="$work/mnt1/vm1.raw" bs=4k count=1 conv=notrunc status=none 2>&1); then
  die "a write to a read-only mount succeeded"
fi
grep -q "Read-only file system" <<<"$out" || die "a write to a read-only mount failed otherwise: $out"
echo > "$work/mnt1/.control/rescan" || die "a rescan on a read-only mount was refused"
umount "$work/mnt1"
wait_gone "$work/mnt1"
say "mount -t fuse.imgfs: ok (read back, write refused with EROFS, rescan, umount)"

say "an fstab line with mount -T (no PATH; the mount point has a space: \\040)"
printf '%s %s fuse.imgfs rw,noauto,nofail,x-systemd.device-timeout=5,cache_size=1M 0 0\n' \
  "$images" "${work// /\\040}/mnt\\0402" >"$work/fstab"
sed 's/^/  /' "$work/fstab"
env -i /bin/mount -T "$work/fstab" "$work/mnt 2" || die "mount -T fstab failed"
[ "$(fstype "$work/mnt 2")" = fuse.imgfs ] || die "no fuse.imgfs mount on 'mnt 2'"
dd if=/dev/zero bs=64k count=1 status=none | tr '\0' '\245' |
  dd of="$work/mnt 2/vm1.raw" bs=64k seek=1 conv=notrunc status=none || die "write through the fstab mount failed"
imgfs status "$work/mnt 2" | sed 's/^/  /'
imgfs unmount "$work/mnt 2" || die "imgfs unmount of the fstab mount failed"
imgfs io -r "$images/vm1.qcow2" -c 'read -P 0xa5 64k 64k' -c 'read -P 0x5a 0 64k' >/dev/null ||
  die "what was written through the fstab mount is not in the image"
qemu-img check -q "$images/vm1.qcow2" || die "qemu-img check failed after the fstab mount"
say "fstab: ok (mounted, written, unmounted, data in the image, qemu-img check clean)"

say "mount -t imgfs (the mount.imgfs name)"
env -i /bin/mount -t imgfs "$images" "$work/mnt1" || die "mount -t imgfs failed"
[ -e "$work/mnt1/vm1.raw" ] || die "no vm1.raw under the -t imgfs mount"
imgfs unmount "$work/mnt1"

# imgfs@.service: systemd is not PID 1 in CI containers, so run its commands the way systemd
# would (instance = escaped mount point, %f = the mount point, variables from the .conf file),
# after systemd-analyze verify has checked the unit.
unit=/usr/lib/systemd/system/imgfs@.service
mnt3="$work/mnt3"
instance=$(systemd-escape --path "$mnt3")
if command -v systemd-analyze >/dev/null; then
  systemd-analyze verify "imgfs@$instance.service" || die "systemd-analyze verify imgfs@$instance.service"
  say "systemd-analyze verify imgfs@$instance.service: ok"
elif [ -n "${CI:-}" ]; then
  die "systemd-analyze is not installed: CI must verify the unit"
else
  say "systemd-analyze not installed (CI unset): unit not verified"
fi
[ "$(systemd-escape --unescape --path "$instance")" = "$mnt3" ] || die "systemd-escape round trip"
IMAGE_DIR=$images
OPTIONS=allow_other
run_unit() { # KEY: runs the unit's KEY= command lines, substituted word by word
  local line word prefix
  local -a argv words
  while IFS= read -r line; do
    argv=()
    # Split as systemd does, quotes included.
    mapfile -t words < <(python3 -c 'import shlex, sys; print("\n".join(shlex.split(sys.argv[1])))' "$line")
    for word in "${words[@]}"; do
      word=${word//%f/$mnt3}
      word=${word//%i/$instance}
      # shellcheck disable=SC2016 # the unit's own ${VAR}, literally
      word=${word//'${IMAGE_DIR}'/$IMAGE_DIR}
      # shellcheck disable=SC2016
      word=${word//'${OPTIONS}'/$OPTIONS}
      argv+=("$word")
    done
    prefix=${argv[0]:0:1}
    argv[0]=${argv[0]#-}
    say "  $1: ${argv[*]}"
    if [ "$prefix" = - ]; then # systemd ignores its failure (here: nothing left to detach)
      "${argv[@]}" 2>/dev/null || say "  (failed, ignored as the unit says)"
    else
      "${argv[@]}" || die "$1 of imgfs@.service failed"
    fi
  done < <(sed -n "s/^$1=//p" "$unit")
}
say "imgfs@$instance.service, its commands as systemd runs them"
run_unit ExecStartPre
run_unit ExecStart
[ "$(fstype "$mnt3")" = fuse.imgfs ] || die "ExecStart returned but $mnt3 is not mounted"
findmnt -n -o OPTIONS --mountpoint "$mnt3" | grep -q allow_other || die "OPTIONS not applied"
run_unit ExecStop
! mountpoint -q "$mnt3" || die "ExecStop left $mnt3 mounted"
run_unit ExecStopPost
# ExecStopPost detaches a dead mount (the daemon crashed), and nothing else: a start that
# failed because another mount is there must leave that one alone.
run_unit ExecStartPre
imgfs mount "$images" "$mnt3" || die "imgfs mount for the ExecStopPost check"
run_unit ExecStopPost
[ "$(fstype "$mnt3")" = fuse.imgfs ] || die "ExecStopPost took a working mount away"
[ -e "$mnt3/vm1.raw" ] || die "ExecStopPost left a mount without vm1.raw"
pkill -KILL -f "imgfs mount $images $mnt3" || die "no daemon to kill"
for _ in $(seq 50); do ! pgrep -f "imgfs mount $images $mnt3" >/dev/null && break; sleep 0.1; done
run_unit ExecStopPost
! mountpoint -q "$mnt3" 2>/dev/null || die "ExecStopPost left the dead mount at $mnt3"
grep -q " $mnt3 " /proc/self/mounts && die "ExecStopPost left the dead mount in the mount table"
say "imgfs@.service: ok"

say "bash completion"
comp() {
  bash -c 'source /usr/share/bash-completion/completions/imgfs
           COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _imgfs 2>/dev/null; echo "${COMPREPLY[*]}"' _ "$@"
}
[ "$(comp imgfs st)" = "stream status" ] || die "completion of 'imgfs st': '$(comp imgfs st)'"
[ "$(comp imgfs mount -o ro,allow_o)" = "ro,allow_other" ] || die "completion of mount -o: '$(comp imgfs mount -o ro,allow_o)'"
[ "$(comp imgfs commit --w)" = "--wait" ] || die "completion of commit options"
say "bash completion: ok"

# ---- 4. Remove it. An enabled instance's link (what systemctl enable makes) goes with it.
wants=/etc/systemd/system/multi-user.target.wants
mkdir -p "$wants"
ln -sf "$unit" "$wants/imgfs@$instance.service"
DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq imgfs >/dev/null 2>&1 || die "apt-get purge imgfs failed"
installed=0
for f in /usr/bin/imgfs /usr/sbin/mount.fuse.imgfs /usr/share/man/man1/imgfs.1.gz "$unit" \
  "$wants/imgfs@$instance.service"; do
  if [ -e "$f" ] || [ -L "$f" ]; then die "$f is still there after apt-get purge"; fi
done
say "package removed"

# ---- 5. Optional (IMGFS_PACKAGE_CHROOT=1; about 2 minutes and 60 MB from the mirror): the
# package in a fresh minimal Debian 12 made by debootstrap, where apt-get has to fetch its
# dependencies.
if [ "${IMGFS_PACKAGE_CHROOT:-0}" = 1 ]; then
  mirror=${IMGFS_DEBIAN_MIRROR:-http://deb.debian.org/debian}
  root="$work/chroot"
  command -v debootstrap >/dev/null ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  say "a fresh Debian 12: debootstrap --variant=minbase bookworm ($mirror)"
  debootstrap --variant=minbase bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log"; die "debootstrap failed"; }
  cp "$deb" "$root/tmp/"
  mount -t proc proc "$root/proc"
  mount --bind /dev "$root/dev"
  # shellcheck disable=SC2016 # expanded inside the chroot
  chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    /bin/bash -euo pipefail -c '
      apt-get update -qq
      apt-get install -y -qq "/tmp/$1" 2>&1 | grep -E "^(Setting up|E:)" || true
      dpkg-query -W imgfs
      imgfs --version
      mkdir -p /srv/images /mnt/d
      imgfs create /srv/images/vm1.qcow2 16M
      mount -t fuse.imgfs /srv/images /mnt/d
      dd if=/dev/zero of=/mnt/d/vm1.raw bs=64k count=4 conv=notrunc status=none
      imgfs unmount /mnt/d
      apt-get purge -y -qq imgfs >/dev/null 2>&1' _ "$(basename "$deb")" 2>&1 | sed 's/^/  /' ||
    die "the package does not install and mount in a fresh Debian 12"
  umount "$root/dev" "$root/proc"
  say "fresh Debian 12 chroot: installed with its dependencies, mounted, written, removed: ok"
fi
say "passed in $(($(date +%s) - t0)) s"
