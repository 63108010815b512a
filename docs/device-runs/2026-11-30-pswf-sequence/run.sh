#!/usr/bin/env bash
# Device run (issue 15; issue 16): sequence-axis PSWF caches on CUDA. A
# SmolLM2-shaped Llama (bf16 weights, f16 caches) compiled on the dev box with
# --strip-weights: dense (`l16`), sequence-axis DCT (`ls16`) and sequence-axis
# PSWF (`lp16`) caches, keep 0.5, blocks of 64, 4 sinks, 256 recent. The CUDA
# session appends both on the host (the CPU runtime's low-pass code, each with
# its basis's matrix) and attention runs the NVPTX kernel `kv_sequence.rs`.
# A 400-token prompt reads low-pass blocks; checked against the CPU and the
# interpreter, memcheck, then timed.
set -u
D=${D:-.device/v21}; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
R=$D/sparsec-run
python3 $D/gpu_compare.py make /tmp/ck/llama --family llama > /dev/null || exit 1
echo "== 400-token prompt, 40 new: against the CPU (--compare-cpu)"
for a in l16 ls16 lp16; do
  $R $D/$a.sparsec --weights /tmp/ck/llama --device cuda --bench-decode --prompt-len 400 --max-new-tokens 40 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
done
echo "== 400-token prompt, 4 new: against the interpreter (--check)"
for a in ls16 lp16; do
  $R $D/$a.sparsec --weights /tmp/ck/llama --device cuda --bench-decode --prompt-len 400 --max-new-tokens 4 --positions 512 --session-seq 512 --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
done
echo -n "lp16 memcheck: "; compute-sanitizer --tool memcheck $R $D/lp16.sparsec --weights /tmp/ck/llama --device cuda --bench-decode --prompt-len 340 --max-new-tokens 3 --positions 512 --session-seq 512 2>&1 | grep "ERROR SUMMARY"
echo "== decode after a 2000-token prompt, 64 new, median of 3 (compressed: no graph replay, host appends)"
for a in l16 ls16 lp16; do
  $R $D/$a.sparsec --weights /tmp/ck/llama --device cuda --bench-decode --prompt-len 2000 --max-new-tokens 64 --repeat 3 --positions 2100 --session-seq 512 --json > $J/$a.json
  python3 -c "import json;b=json.load(open('$J/$a.json'))['bench'];print('$a:', round(b['decode_tokens_per_s'],1), 'tok/s; prefill 2000', round(1e3*b['timing']['prefill_s'],1), 'ms')"
done
tar czf $OUT/results.tar.gz -C $J .
echo done
