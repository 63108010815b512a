#!/usr/bin/env bash
# Device run 2 for issue 16: the warp-per-output NVPTX matmul (128-bit loads,
# shfl.sync reduction) in CUDA sessions: checks, memcheck, decode speed.
set -u
D=.h16dev; R=$D/sparsec-run; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for m in gpt2_tiny llama_tiny; do
  echo "== $m: session vs interpreter and CPU (10-token prompt in calls of 6, session chunks of 4, 12 decode steps)"
  $R $D/art/$m.sparsec --device cuda --bench-decode --prompt-len 10 --max-new-tokens 12 --prefill-rows 6 --session-seq 4 --positions 32 --check --compare-cpu
  for s in 1 17 32; do echo "== $m: whole sequence seq $s"; $R $D/art/$m.sparsec --device cuda --seq $s --check --compare-cpu | tail -2; done
done
echo "== memcheck (tiny GPT-2 and Llama decode)"
for m in gpt2_tiny llama_tiny; do compute-sanitizer --tool memcheck $R $D/art/$m.sparsec --device cuda --bench-decode --prompt-len 10 --max-new-tokens 4 --session-seq 4 --positions 32 2>&1 | grep -E "ERROR SUMMARY" | head -3; done
mkdir -p /tmp/ck
for m in gpt2 llama; do
  python3 $D/gpu_compare.py make /tmp/ck/$m --family $m && python3 $D/gpu_compare.py pack /tmp/ck/$m $D/art/$m.sparsec || exit 1
done
for m in gpt2 llama; do
  echo "== $m: session vs CPU session (16-token prompt in calls of 5, 6 decode steps; atol 1e-3)"
  $R $D/art/$m.sparsec --trust --device cuda --bench-decode --prompt-len 16 --max-new-tokens 6 --prefill-rows 5 --compare-cpu --atol 1e-3 --rtol 1e-3
  echo "== $m: sparsec decode bench"
  $R $D/art/$m.sparsec --trust --device cuda --bench-decode --prompt-len 128 --max-new-tokens 128 --repeat 3 --json > $OUT/$m-sparsec.json
  python3 -c "import json; r=json.load(open('$OUT/$m-sparsec.json')); b=r['bench']; print('sparsec', r['device'], 'decode tok/s %.1f (%.3f ms/token) prefill 128 in %.4f s' % (b['decode_tokens_per_s'], b['decode_ms_per_token'], b['timing']['prefill_s']))"
done
echo "== nsys-free kernel split: ncu not used; done"
