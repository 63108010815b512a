#!/usr/bin/env bash
# Runs every test of the workspace after installing what they need.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --workspace -- --skip cuda_run_equals_cpu
# GPU tests: run on the GPU machine; here they say visibly that they skip.
cargo test -q --test compile_and_run cuda_run_equals_cpu -- --nocapture
