#!/usr/bin/env bash
# A throwaway one-node Ceph cluster for tests and benchmarks: one monitor and one OSD whose
# objects live in its RAM (memstore), no manager, no authentication, loopback only, pools of
# size 1. Nothing outside DIR is touched, and it is stopped by the PIDs it recorded.
#
#   tests/ceph/cluster.sh start DIR [--port N] [--osd-mib N] [--op-shards N]
#                                                     prints the ceph.conf path
#   tests/ceph/cluster.sh stop DIR
#
# Clients use it with CEPH_CONF=DIR/ceph.conf. `start` creates the pool "rbd". A second
# cluster in a second DIR (another --port) can run beside the first.
set -euo pipefail

usage() {
  echo "usage: $0 start DIR [--port N] [--osd-mib N] [--op-shards N] | stop DIR" >&2
  exit 2
}

# The cluster is thrown away, so its daemons are killed outright (a clean stop of an OSD
# whose monitor went first takes seconds); waits until both are gone.
# A daemon is gone once it has exited: its sockets and memory are released then, while it may
# stay a zombie for seconds until whoever adopted it reaps it (a container's init can be slow).
exited() {
  local state
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 0
  [ -z "$state" ] || [ "$state" = Z ] || [ "$state" = X ]
}

stop_cluster() {
  local dir=$1 name pid i
  for name in osd mon; do
    [ -f "$dir/$name.pid" ] || continue
    pid=$(cat "$dir/$name.pid")
    kill -9 "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
      exited "$pid" && break
      sleep 0.02
    done
    rm -f "$dir/$name.pid"
  done
}

start_cluster() {
  local dir=$1 port=$2 osd_mib=$3 op_shards=$4 conf fsid uuid t0 i
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if [ -e "$dir/ceph.conf" ]; then
    echo "cluster.sh: $dir already holds a cluster; stop it and use an empty directory" >&2
    return 2
  fi
  conf="$dir/ceph.conf"
  fsid=$(cat /proc/sys/kernel/random/uuid)
  t0=$(date +%s.%N)
  cat >"$conf" <<CONF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$port
public network = 127.0.0.0/8
auth cluster required = none
auth service required = none
auth client required = none
run dir = $dir/run
log file = $dir/\$name.log
ms bind retry count = 1
paxos propose interval = 0.1
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd objectstore = memstore
memstore device bytes = $((osd_mib * 1024 * 1024))
# memstore counts the bytes it holds in a plain integer that every op thread updates, so with
# several threads the count drifts, and once it goes below zero the OSD calls itself full and
# blocks every write (seen in CI: "failsafe engaged ... now -2147483648% full"). One op shard
# with one thread applies every transaction in turn. The benchmarks ask for Ceph's usual 5.
osd op num shards = $op_shards
osd op num threads per shard = 1
osd crush chooseleaf type = 0
# A client killed with its image locks held is seen gone (and its lock breakable) after this.
osd client watch timeout = 5
[mon.a]
mon data = $dir/mon
[osd.0]
osd data = $dir/osd
CONF
  mkdir -p "$dir/run" "$dir/mon" "$dir/osd"
  monmaptool --create --clobber --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$dir/monmap" >/dev/null
  ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" >>"$dir/mon.out" 2>&1
  # The daemons fork; their output goes to files so that no caller's pipe stays open.
  ceph-mon -c "$conf" -i a --pid-file "$dir/mon.pid" >>"$dir/mon.out" 2>&1
  uuid=$(cat /proc/sys/kernel/random/uuid)
  export CEPH_CONF=$conf
  local id
  id=$(timeout 30 ceph osd new "$uuid")
  [ "$id" = 0 ] || { echo "cluster.sh: unexpected OSD id $id" >&2; return 1; }
  ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$uuid" >>"$dir/osd.out" 2>&1
  ceph-osd -c "$conf" -i 0 --pid-file "$dir/osd.pid" >>"$dir/osd.out" 2>&1
  timeout 30 ceph osd pool create rbd 8 8 >/dev/null 2>&1
  timeout 30 ceph osd pool application enable rbd rbd >/dev/null 2>&1
  # Ready when a client can write and read an object.
  for i in $(seq 1 300); do
    if echo ok | timeout 5 rados -p rbd put cluster-ready - 2>/dev/null; then
      echo "cluster.sh: ready in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s" >&2
      echo "$conf"
      return 0
    fi
    sleep 0.1
  done
  echo "cluster.sh: the cluster in $dir did not become ready (logs: $dir/*.log)" >&2
  return 1
}

[ $# -ge 2 ] || usage
cmd=$1 dir=$2
shift 2
port=3300 osd_mib=2048 op_shards=1
while [ $# -gt 0 ]; do
  case "$1" in
    --port) port=$2; shift 2 ;;
    --osd-mib) osd_mib=$2; shift 2 ;;
    --op-shards) op_shards=$2; shift 2 ;;
    *) usage ;;
  esac
done
case "$cmd" in
  start)
    rc=0
    start_cluster "$dir" "$port" "$osd_mib" "$op_shards" || rc=$?
    if [ "$rc" = 1 ]; then
      stop_cluster "$dir"  # what this start began
    fi
    exit "$rc" ;;
  stop) stop_cluster "$dir" ;;
  *) usage ;;
esac
