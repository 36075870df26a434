#!/bin/sh
# Daemon and client on one CPU (the per-CPU-queue steady state: the loop serving queue N runs
# on CPU N, as the client does), alternating transports, nice -10.
ITERS=${ITERS:-100000}; ROUNDS=${ROUNDS:-4}
r=1
while [ $r -le $ROUNDS ]; do
  for cpu in 0 1; do
    for mode in "uring:--mode=uring" "classic:--mode=classic" "sync:--mode=sync"; do
      mname=${mode%%:*}; margs=${mode#*:}
      out=$(nice -n -10 timeout -s KILL 120 ./probe $margs --iters=$ITERS --daemon-cpu=$cpu --client-cpu=$cpu 2>&1)
      us=$(echo "$out" | sed -n 's/.*QD1: \([0-9.]*\) us.*/\1/p')
      cpu_s=$(echo "$out" | sed -n 's/.*daemon cpu \([0-9.]*\) s.*/\1/p')
      echo "round=$r cpu=$cpu mode=$mname us_per_req=$us daemon_cpu_s=$cpu_s load=$(cut -d' ' -f1 /proc/loadavg)"
    done
  done
  r=$((r+1))
done
