#!/bin/sh
# Alternating rounds over transport x placement; one line per run. Runs at nice -10 so that
# the (short) measurement is less at the mercy of concurrent builds on this 2-core machine.
ITERS=${ITERS:-100000}
ROUNDS=${ROUNDS:-3}
r=1
while [ $r -le $ROUNDS ]; do
  for place in "same:--daemon-cpu=0 --client-cpu=0" "cross:--daemon-cpu=0 --client-cpu=1" "free:"; do
    name=${place%%:*}; args=${place#*:}
    for mode in "uring:--mode=uring --taskrun=coop" "uring-defer:--mode=uring --taskrun=defer" "classic:--mode=classic" "sync:--mode=sync"; do
      mname=${mode%%:*}; margs=${mode#*:}
      out=$(nice -n -10 timeout -s KILL 120 ./probe $margs --iters=$ITERS $args 2>&1)
      us=$(echo "$out" | sed -n 's/.*QD1: \([0-9.]*\) us.*/\1/p')
      cpu=$(echo "$out" | sed -n 's/.*daemon cpu \([0-9.]*\) s.*/\1/p')
      echo "round=$r place=$name mode=$mname us_per_req=$us daemon_cpu_s=$cpu load=$(cut -d' ' -f1 /proc/loadavg)"
    done
  done
  r=$((r+1))
done
