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
echo "== the default model (SmolLM2-135M-Instruct Q4_1 GGUF), compiled with its weights kept quantized =="
target/debug/sparsec compile smollm2 -o target/demo/smollm2.sparsec
echo "== generate with the compiled model (KV cache), then with the reference interpreter =="
target/debug/sparsec run target/demo/smollm2.sparsec --prompt "The capital of France is" --max-new-tokens 20
target/debug/sparsec run smollm2 --prompt "The capital of France is" --max-new-tokens 20
echo "== prefill and decode speed of the compiled model =="
target/debug/sparsec bench target/demo/smollm2.sparsec --prompt-len 128 --new-tokens 32
echo "== perplexity on the first 512 tokens of GPL-3 (llama.cpp, F32-dequantized: 18.83) =="
target/debug/sparsec eval target/demo/smollm2.sparsec --text /usr/share/common-licenses/GPL-3 --max-tokens 512
