#!/usr/bin/env bash
# The demo: compile the MLP block of examples/mlp_block.sir for the CPU (and PTX),
# run it and compare with the reference interpreter; then the default model,
# dense and with a sparsity plan; then sweep the specialization dial on two of
# its matrices.
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
echo "== a plan: 90% unstructured sparsity in every attention and MLP matrix and the LM head =="
cat > target/demo/sparse-0.9.toml <<'PLAN'
[[rule]]
layers = "all"
target = "attn.*,mlp.*,lm_head"
sparsity = { kind = "unstructured", ratio = 0.9 }
specialize = "auto"
PLAN
target/debug/sparsec inspect smollm2 --plan target/demo/sparse-0.9.toml | sed -n "1,10p"
target/debug/sparsec compile smollm2 --plan target/demo/sparse-0.9.toml -o target/demo/smollm2-sparse.sparsec
target/debug/sparsec inspect target/demo/smollm2-sparse.sparsec | sed -n '1,12p'
echo "== its decode speed (magnitude pruning without retraining: fast, and the text is gone) =="
target/debug/sparsec bench target/demo/smollm2-sparse.sparsec --prompt-len 128 --new-tokens 32
echo "== the specialization dial on SmolLM2's K/V projections: compile time and code size against run time =="
target/debug/sparsec tradeoff examples/smollm2_kv_proj.sir --sparsity 0.9 --pattern unstructured,block4x4 \
  --levels dense,generic,indices --out target/demo/tradeoff --fresh
