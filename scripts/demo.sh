#!/usr/bin/env bash
# Installs missing packages, builds imgfs, and runs the demo in examples/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
bash scripts/build.sh build
bash examples/demo.sh
