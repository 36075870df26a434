#!/usr/bin/env bash
# Benchmarks imgfs against qemu-storage-daemon's FUSE export and qcowmount (see README.md here),
# or, with --suite rbd, on a Ceph pool against qemu-storage-daemon's rbd driver and rbd-fuse.
# Installs missing Debian packages, builds the optimised binary in build-rel/, runs bench.py.
# Usage, as root:  tests/bench/run.sh [--quick] [--rounds N] [--runtime S] [--jobs a,b] [--out FILE]
#                  [--suite table|transport|rbd|guest]
#                  (tests/bench/run.sh --help lists every option)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
py=/usr/bin/python3
[ -x "$py" ] || py=python3
for a in "$@"; do
  # --help needs nothing installed or built
  case "$a" in -h | --help) exec "$py" "$here/bench.py" --help ;; esac
done
if [ "$(id -u)" -ne 0 ]; then
  echo "run.sh: run as root (FUSE mounts, loop devices, drop_caches, apt-get)" >&2
  exit 1
fi

# The Ceph suite (--suite rbd, or an rbd contender named in --contenders) also needs a
# cluster (ceph-mon, ceph-osd, ceph-common), QEMU's rbd driver and rbd-fuse.
# The guest suite (--suite guest, guest.py) boots a QEMU guest on each export instead.
rbd='' guest='' prev='' rest=()
for a in "$@"; do
  case "$prev:$a" in
    --suite:rbd | *:--suite=rbd | --contenders:*rbd* | *:--contenders=*rbd*) rbd=1 ;;
    --suite:guest | *:--suite=guest) guest=1 ;;
  esac
  case "$a" in --suite | --suite=*) ;; *) [ "$prev" = --suite ] || rest+=("$a") ;; esac
  prev=$a
done

# Build dependencies (only what is missing), then what the benchmark itself runs.
bash "$root/scripts/deps.sh"
need=(fio qemu-utils qemu-system-common e2fsprogs python3 util-linux fuse3 tar coreutils)
[ -z "$rbd" ] || need+=(rbd-fuse ceph-mon ceph-osd ceph-common qemu-block-extra)
[ -z "$guest" ] || need+=(qemu-system-x86 busybox-static g++ kmod dpkg)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
export DEBIAN_FRONTEND=noninteractive
updated=
if [ ${#missing[@]} -gt 0 ]; then
  echo "run.sh: installing ${missing[*]}"
  apt-get update -qq && updated=1
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# qcowmount is optional: if it cannot be installed the report says n/a for it.
if ! dpkg-query -W -f='${Status}' libqcow-utils 2>/dev/null | grep -q "install ok installed"; then
  echo "run.sh: installing libqcow-utils (qcowmount)"
  { [ -n "$updated" ] || apt-get update -qq; } &&
    apt-get install -y -qq --no-install-recommends libqcow-utils >/dev/null ||
    echo "run.sh: libqcow-utils could not be installed; qcowmount will be reported as n/a" >&2
fi

cmake -S "$root" -B "$root/build-rel" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$root/build-rel" --target imgfs -j"$(nproc)"

if [ -n "$guest" ]; then
  exec "$py" "$here/guest.py" --imgfs "$root/build-rel/imgfs" ${rest[@]+"${rest[@]}"}
fi
exec "$py" "$here/bench.py" --imgfs "$root/build-rel/imgfs" "$@"
