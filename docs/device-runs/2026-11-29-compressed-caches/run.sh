#!/usr/bin/env bash
# Device run (issue 15, item 6; issue 16): compressed KV caches on CUDA. A
# SmolLM2-shaped Llama (bf16 weights, f16 activations' caches) compiled on the
# dev box with --strip-weights: dense (`l16`), chunked-SVD caches (chunk 64,
# rank 16: `lc16`) and sequence-axis DCT caches (keep 0.5, blocks of 64, 4
# sinks, 256 recent: `ls16`). The CUDA session appends compressed caches on the
# host (the CPU runtime's factoring and low-pass code) and uploads what they
# wrote; attention runs the NVPTX kernels `kv_chunked.rs` / `kv_sequence.rs`.
# A 400-token prompt reads factored chunks and low-pass blocks; checked against
# the CPU and the interpreter, then timed.
set -u
D=${D:-.device/v17}; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
R=$D/sparsec-run
python3 $D/gpu_compare.py make /tmp/ck/llama --family llama > /dev/null || exit 1
echo "== 400-token prompt, 40 new: against the CPU (--compare-cpu)"
for a in l16 lc16 ls16; do
  $R $D/$a.sparsec --weights /tmp/ck/llama --device cuda --bench-decode --prompt-len 400 --max-new-tokens 40 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
done
echo "== 400-token prompt, 4 new: against the interpreter (--check)"
for a in lc16 ls16; do
  $R $D/$a.sparsec --weights /tmp/ck/llama --device cuda --bench-decode --prompt-len 400 --max-new-tokens 4 --positions 512 --session-seq 512 --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
done
echo -n "lc16 memcheck: "; compute-sanitizer --tool memcheck $R $D/lc16.sparsec --weights /tmp/ck/llama --device cuda --bench-decode --prompt-len 140 --max-new-tokens 3 --positions 256 --session-seq 256 2>&1 | grep "ERROR SUMMARY"
echo -n "ls16 memcheck: "; compute-sanitizer --tool memcheck $R $D/ls16.sparsec --weights /tmp/ck/llama --device cuda --bench-decode --prompt-len 340 --max-new-tokens 3 --positions 512 --session-seq 512 2>&1 | grep "ERROR SUMMARY"
echo "== decode after a 2000-token prompt, 64 new, median of 3 (compressed: no graph replay, host appends)"
for a in l16 lc16 ls16; do
  $R $D/$a.sparsec --weights /tmp/ck/llama --device cuda --bench-decode --prompt-len 2000 --max-new-tokens 64 --repeat 3 --positions 2100 --session-seq 512 --json > $J/$a.json
  python3 -c "import json;b=json.load(open('$J/$a.json'))['bench'];print('$a:', round(b['decode_tokens_per_s'],1), 'tok/s; prefill 2000', round(1e3*b['timing']['prefill_s'],1), 'ms')"
done
tar czf $OUT/results.tar.gz -C $J .
echo done
