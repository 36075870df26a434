#!/usr/bin/env bash
# Installs the Debian 12 packages imgfs needs to build, test, package and benchmark (only the
# missing ones). dpkg-dev and file: cpack's dependency list (dpkg-shlibdeps); man-db and
# systemd (systemd-analyze, systemd-escape): scripts/package_test.sh.
set -euo pipefail
packages=(
  build-essential cmake ninja-build pkg-config clang clang-format clang-tidy-19 libclang-rt-14-dev
  libfuse3-dev fuse3 liburing-dev zlib1g-dev libzstd-dev libfmt-dev libgtest-dev
  librbd-dev librados-dev ceph-mon ceph-osd ceph-common qemu-block-extra
  qemu-utils qemu-system-common qemu-system-x86 busybox-static fio e2fsprogs fdisk xfsprogs python3 python3-pyflakes
  util-linux kmod procps strace passwd
  dpkg-dev file man-db systemd
)
missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "imgfs: missing packages: ${missing[*]} (run as root to install them)" >&2
    exit 1
  fi
  echo "imgfs: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
