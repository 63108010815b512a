#!/usr/bin/env bash
# The demo: compile the MLP block of examples/mlp_block.sir for the CPU (and PTX),
# run it, and compare with the reference interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build -q --bin sparsec
out="target/demo/mlp_block.sparsec"
mkdir -p target/demo
echo "== compile (cold: private cache) =="
export SPARSEC_CACHE_DIR="target/demo/cache"
rm -rf "$SPARSEC_CACHE_DIR"
target/debug/sparsec compile examples/mlp_block.sir -o "$out" --target all --ptxas
echo "== compile again (cache hit) =="
target/debug/sparsec compile examples/mlp_block.sir -o "$out" --target all
echo "== run on the CPU, checked against the reference interpreter =="
target/debug/sparsec run "$out" --seq 4 --check
echo "== bench (seq 256) =="
target/debug/sparsec bench "$out" --seq 256 --repeat 20
