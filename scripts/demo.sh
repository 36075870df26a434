#!/usr/bin/env bash
# Installs missing packages, builds imgfs, and runs the demo in examples/.
# With IMGFS_BIN set (e.g. IMGFS_BIN=/usr/bin/imgfs after installing the package) it runs the
# demo against that binary and builds nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
if [ -z "${IMGFS_BIN:-}" ]; then
  bash scripts/build.sh build
fi
bash examples/demo.sh
