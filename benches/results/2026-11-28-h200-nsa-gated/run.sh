#!/usr/bin/env bash
# Device run (issue 14): gated native sparse attention on NVPTX. Tiny Llama
# with #nsa(block 4, top 2, window 8, sink 1) joint, fixed gates and trained
# adapters (sigmoid gates, linear compression): sessions vs interpreter and
# CPU, memcheck/racecheck; SmolLM2-shaped Llama dense, nsa joint and nsa with
# fixed gates: session vs CPU session at 1100 positions, decode after 4096.
set -u
D=.device; R=$D/sparsec-run; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for t in nsa nsa_fx nsa_ad; do
  T=$D/art/llama_tiny_$t.sparsec
  echo "== tiny $t: session vs interpreter and CPU (20-token prompt in calls of 6, chunks of 4, 12 decode steps)"
  $R $T --device cuda --bench-decode --prompt-len 20 --max-new-tokens 12 --prefill-rows 6 --session-seq 4 --positions 40 --check --compare-cpu 2>&1 | tail -3
  echo "== tiny $t: whole sequence seq 30"; $R $T --device cuda --seq 30 --check --compare-cpu 2>&1 | tail -2
  compute-sanitizer --tool memcheck $R $T --device cuda --bench-decode --prompt-len 20 --max-new-tokens 6 --session-seq 4 --positions 40 2>&1 | grep -E "ERROR SUMMARY" | head -2
  compute-sanitizer --tool racecheck $R $T --device cuda --bench-decode --prompt-len 20 --max-new-tokens 6 --session-seq 4 --positions 40 2>&1 | grep -E "RACECHECK SUMMARY|ERROR SUMMARY" | head -2
done
mkdir -p /tmp/ck
python3 $D/gpu_compare.py make /tmp/ck/llama --family llama || exit 1
for m in llama llama_nsa llama_nsa_fx llama_nsa16; do
  python3 $D/gpu_compare.py pack /tmp/ck/llama $D/art/$m.sparsec || exit 1
done
echo "== llama_nsa_fx: session vs CPU session (1100-token prompt in calls of 512, 8 decode steps)"
$R $D/art/llama_nsa_fx.sparsec --trust --device cuda --bench-decode --prompt-len 1100 --max-new-tokens 8 --prefill-rows 512 --compare-cpu --atol 1e-3 --rtol 1e-3 2>&1 | tail -2
# Blocks of 16: up to 480 candidates, more than the selection's register
# slots hold (256), so the rounds also score blocks again.
echo "== llama_nsa16: session vs CPU session (6000-token prompt in calls of 512, 8 decode steps)"
$R $D/art/llama_nsa16.sparsec --trust --device cuda --bench-decode --prompt-len 6000 --max-new-tokens 8 --prefill-rows 512 --positions 6100 --compare-cpu --atol 1e-3 --rtol 1e-3 2>&1 | tail -2
for m in llama llama_nsa llama_nsa_fx; do
  $R $D/art/$m.sparsec --trust --device cuda --bench-decode --prompt-len 4096 --max-new-tokens 64 --positions 4200 --repeat 2 --profile --json > $OUT/$m-4096.json
  python3 -c "
import json; r=json.load(open('$OUT/$m-4096.json')); b=r['bench']
print('$m', r['device'], 'decode tok/s %.1f (%.3f ms/token) prefill 4096 in %.3f s' % (b['decode_tokens_per_s'], b['decode_ms_per_token'], b['timing']['prefill_s']))
a=sum(v['ms'] for k,v in r['profile_ms_per_token'].items() if 'attention' in k or 'nsa' in k); print('  attention + nsa kernels %.4f ms/token' % a)
for k,v in sorted(r['profile_ms_per_token'].items(), key=lambda kv:-kv[1]['ms'])[:5]: print('  %-32s %8.4f ms/token' % (k, v['ms']))"
done
