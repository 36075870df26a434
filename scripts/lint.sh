#!/usr/bin/env bash
# Formatting, the request-lifetime checks, the coroutine-safety clang-tidy checks, and pyflakes
# on the Python tests and tools (unused imports, undefined names).
set -euo pipefail
cd "$(dirname "$0")/.."
files=$(git ls-files '*.cc' '*.h')
clang-format --dry-run -Werror $files
# Request lifetimes in the control plane (docs/contributing.md): what a textual check can see.
python3 scripts/check_lifetimes.py $(git ls-files 'fuse/*.cc' 'jobs/*.cc' 'drivers/*.cc' 'drivers/*/*.cc')
/usr/bin/python3 -m pyflakes $(git ls-files '*.py')
[ -f build/compile_commands.json ] || bash scripts/build.sh build
sources=$(git ls-files 'core/*.cc' 'drivers/*.cc' 'drivers/**/*.cc' 'jobs/*.cc' 'fuse/*.cc')
# Only the two checks that guard coroutine lifetimes are enforced as errors here.
printf '%s\n' $sources | xargs -P"$(nproc)" -n4 clang-tidy-19 -p build --quiet \
  --checks='-*,cppcoreguidelines-avoid-capturing-lambda-coroutines,cppcoreguidelines-avoid-reference-coroutine-parameters' \
  --warnings-as-errors='*' 2>/dev/null
echo "lint: ok"
