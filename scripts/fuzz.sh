#!/usr/bin/env bash
# The libFuzzer targets: builds them (clang, ASan, UBSan, libFuzzer) into build-fuzz/, makes the
# seed corpus from qemu-img images, runs every target for IMGFS_FUZZ_SECONDS (default 20) and
# prints one line per target. Exits non-zero if any target found a crash (crash, leak, timeout
# or out-of-memory); the inputs are in build-fuzz/crashes/, the logs in build-fuzz/logs/.
# Installs nothing: needs clang, libclang-rt-14-dev (libFuzzer) and qemu-utils.
#
# A crash found becomes a regression test: copy the input to
# tests/fuzz/regressions/<target>/<short-name>; tests/qcow2/fuzz_regression_test.cc replays it.
# To replay one input by hand: build-fuzz/tests/fuzz/<target> <file>
# (IMGFS_FUZZ_VERBOSE=1 prints what the image driver did).
set -euo pipefail
cd "$(dirname "$0")/.."
export LC_ALL=C
seconds=${IMGFS_FUZZ_SECONDS:-20}
dir=build-fuzz
targets=(fuzz_header fuzz_image fuzz_l2)

for tool in clang clang++ qemu-img qemu-io; do
  command -v "$tool" >/dev/null || { echo "fuzz: $tool is missing" >&2; exit 1; }
done

CC=clang CXX=clang++ cmake -S . -B "$dir" -G Ninja -DIMGFS_FUZZ=ON -DIMGFS_SANITIZE=ON \
  -DIMGFS_TESTS=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo -DIMGFS_DEBUG_INFO=-gline-tables-only >/dev/null
cmake --build "$dir" --target "${targets[@]}"

bash tests/fuzz/make_corpus.sh "$dir/corpus"
mkdir -p "$dir/crashes" "$dir/logs"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:malloc_context_size=20}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:abort_on_error=1:print_stacktrace=1}

failed=0
for t in "${targets[@]}"; do
  # Stored crash inputs are not seeds: until their bug is fixed they would stop every run at
  # once (tests/qcow2/fuzz_regression_test.cc replays them).
  corpus=("$dir/corpus/$t")
  log="$dir/logs/$t.log"
  before=$(ls "$dir/crashes")
  rc=0
  "$dir/tests/fuzz/$t" -max_total_time="$seconds" -rss_limit_mb=1024 -timeout=10 \
    -dict=tests/fuzz/qcow2.dict -print_final_stats=1 \
    -artifact_prefix="$dir/crashes/$t-" "${corpus[@]}" >"$log" 2>&1 || rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  [ -n "$runs" ] || runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -n 1)
  # crash-, leak-, timeout- and oom- inputs count; slow-unit- ones do not.
  new=$(comm -13 <(echo "$before") <(ls "$dir/crashes") | grep -E "^$t-(crash|leak|timeout|oom)-" ||
    true)
  crashes=$(echo -n "$new" | grep -c . || true)
  if [ "$rc" != 0 ] && [ "$crashes" = 0 ]; then
    crashes=1  # died without writing an input (e.g. on a seed): still a failure
  fi
  echo "fuzz $t: ${runs:-0} runs, $crashes crashes"
  if [ "$crashes" != 0 ]; then
    failed=1
    [ -z "$new" ] || echo "$new" | sed "s|^|  input: $dir/crashes/|"
    grep -m1 -E "ERROR: |^fuzz_[a-z0-9]*: " "$log" | sed 's/^/  /' || true
    echo "  log: $log"
  fi
done
exit "$failed"
