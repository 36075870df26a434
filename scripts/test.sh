#!/usr/bin/env bash
# The full test suite: installs missing packages, builds, runs every test tier.
# Usage: scripts/test.sh [--sanitize] [--long]
set -euo pipefail
cd "$(dirname "$0")/.."
sanitize=0
for a in "$@"; do
  case "$a" in
    --sanitize) sanitize=1 ;;
    --long) export IMGFS_LONG=1 ;;
    *) echo "usage: scripts/test.sh [--sanitize] [--long]" >&2; exit 2 ;;
  esac
done
bash scripts/deps.sh
if [ "$sanitize" = 1 ]; then
  dir=build-asan
  # The differential matrix on a Ceph pool: 4 of its 13 images (the plain build runs all). Set
  # before the build, whose test discovery lists the cases the binary makes.
  export IMGFS_POOL_CASES=${IMGFS_POOL_CASES:-some}
  # The same bound leaves out the pool variants of test_export's fio and kill classes here
  # (ceph_pool.on_both_stores), and makes 5 kill runs per job kind (test_jobs) of the plain
  # build's 10.
  export IMGFS_KILL_RUNS=${IMGFS_KILL_RUNS:-5}
  # test_rbd's three cases that wait out Ceph's timeouts (about 100 s): the plain build runs them.
  export IMGFS_POOL_SLOW_CASES=${IMGFS_POOL_SLOW_CASES:-0}
  # The sanitizer build also checks the qcow2 metadata invariants after every step.
  # Line tables only: enough for the sanitizers' reports, and a faster build.
  CC=clang CXX=clang++ bash scripts/build.sh "$dir" -DIMGFS_SANITIZE=ON -DIMGFS_WERROR=ON \
    -DIMGFS_DEBUG_CHECKS=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo -DIMGFS_DEBUG_INFO=-gline-tables-only
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
  export UBSAN_OPTIONS=halt_on_error=1:abort_on_error=1:print_stacktrace=1
  # The plain build sweeps every crash point and runs every concurrent fault case; under the
  # sanitizers every 10th is enough, and one run of each full-disk reproduction (CI's run must
  # stay under 40 minutes; --long and IMGFS_EXHAUSTION_RUNS=20 are the thorough runs).
  export IMGFS_CRASH_STRIDE=${IMGFS_CRASH_STRIDE:-10}
  export IMGFS_EXHAUSTION_RUNS=${IMGFS_EXHAUSTION_RUNS:-1}
  # Likewise one of the concurrency race's three seeds, and one on a pool: the plain build runs
  # them all with one loop, and two with two loops.
  export IMGFS_STRESS_SEEDS=${IMGFS_STRESS_SEEDS:-1}
  export IMGFS_STRESS_POOL_SEEDS=${IMGFS_STRESS_POOL_SEEDS:-1}
  # ASan's shadow memory and quarantine raise the daemon's RSS; the malformed-image test's bound
  # (200 MiB in the plain build) allows for that.
  export IMGFS_MEM_LIMIT_MB=${IMGFS_MEM_LIMIT_MB:-768}
else
  dir=build
  # Line tables (backtraces) without full debug info: about a quarter less compile time.
  bash scripts/build.sh "$dir" -DIMGFS_WERROR=ON -DIMGFS_DEBUG_INFO=-g1
fi
export IMGFS_BIN="$PWD/$dir/imgfs"
# The two builds serve every mount over a different FUSE transport, so CI, which runs both,
# runs every test on each: the plain build with FUSE over io_uring switched on (mounts take it
# through uring=auto), the sanitizer build with it off (the /dev/fuse path). The kernel's
# switch is restored afterwards; test_transport flips it per test itself.
uring_param=/sys/module/fuse/parameters/enable_uring
[ -e "$uring_param" ] || modprobe fuse 2>/dev/null || true
if [ "$sanitize" = 1 ]; then uring_want=N; else uring_want=Y; fi
if [ -w "$uring_param" ]; then
  uring_saved=$(cat "$uring_param")
  trap 'echo "$uring_saved" > "$uring_param"' EXIT
  echo "$uring_want" > "$uring_param"
  echo "== FUSE over io_uring: enable_uring=$uring_want for this run"
elif [ -n "${CI:-}" ]; then
  echo "test.sh: $uring_param is not writable; CI must test both FUSE transports" >&2
  exit 1
else
  echo "test.sh: $uring_param not writable (CI unset): mounts use the kernel's setting" >&2
fi
# One summary line per reliability category (ctest keeps every test's output in LastTest.log;
# the fault matrix runs one case per process, so its lines are added up).
summarize() {
  local log="$dir/Testing/Temporary/LastTest.log"
  [ -f "$log" ] || return 0
  echo "== summary$1"
  grep -hE "^(crash-harness \(|concurrent faults \(|malformed images:|faults:|security:|concurrency:)" "$log" || true
  awk '/^fault matrix: [0-9]+ cases run, [0-9]+ passed/ { run += $3; ok += $6 }
       END { if (run) printf "fault matrix: %d cases run, %d passed\n", run, ok }' "$log"
  awk '/^concurrent faults \(/ { run += $4; ok += $7 }
       END { if (run) printf "concurrent faults in all: %d cases run, %d passed\n", run, ok }' "$log"
}
rc=0
ctest --test-dir "$dir" --output-on-failure -j"$(nproc)" --timeout 900 || rc=$?
summarize ""
if [ "$sanitize" = 1 ] && [ -w "$uring_param" ]; then
  # The ring transport under the sanitizers: the tests that race control clients and jobs
  # against I/O and inject faults, once more with FUSE over io_uring on and two ring loops,
  # where entry buffers change hands between threads and the loops defer completions.
  # (test_transport covers the ring's own cases in both builds. test_jobs stays on the plain
  # build's ring run only, which keeps CI within its 40 minutes.) 65-80 s in CI.
  echo Y > "$uring_param"
  echo "== FUSE over io_uring: enable_uring=Y, threads=2, for the sanitizer ring pass"
  IMGFS_TEST_MOUNT_OPTIONS=threads=2,uring=on ctest --test-dir "$dir" --output-on-failure --timeout 900 --no-tests=error \
    -R '^integration\.(test_concurrency|test_faults)$' || rc=$?
  summarize " (sanitizer ring pass)"
  echo "$uring_want" > "$uring_param"
fi
exit "$rc"
