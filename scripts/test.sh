#!/usr/bin/env bash
# Runs every test of the workspace after installing what they need.
# A test whose requirement is missing prints `SKIPPED: <test>: <what>` (visible
# without --nocapture); with CI=true (as .ci/run sets) it fails instead, except
# for the GPU tests, which skip where there is no GPU (tests/common/mod.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Formatting and lints first: they fail in seconds where the tests take minutes.
cargo fmt --all -- --check
(cd fuzz && cargo fmt -- --check)
cargo clippy --workspace --all-targets -- -D warnings
# No incremental state: CI builds once, and it cost 1.6 GB of disk.
CARGO_INCREMENTAL=0 cargo test --workspace
