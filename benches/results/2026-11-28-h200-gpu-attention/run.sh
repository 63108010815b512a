#!/usr/bin/env bash
# Device run (issue 16 + 14): the warp-per-(row, head) GPU attention; sessions
# vs the interpreter and the CPU (tiny GPT-2/Llama, a windowed Llama), memcheck,
# then GPT-2 124M / SmolLM2-shaped Llama decode with a profile, and PyTorch eager.
set -u
D=.device; R=$D/sparsec-run; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for m in gpt2_tiny llama_tiny llama_tiny_win; do
  echo "== $m: session vs interpreter and CPU (10-token prompt in calls of 6, session chunks of 4, 12 decode steps)"
  $R $D/art/$m.sparsec --device cuda --bench-decode --prompt-len 10 --max-new-tokens 12 --prefill-rows 6 --session-seq 4 --positions 32 --check --compare-cpu 2>&1 | tail -3
  echo "== $m: whole sequence seq 17"; $R $D/art/$m.sparsec --device cuda --seq 17 --check --compare-cpu 2>&1 | tail -2
done
echo "== memcheck and racecheck (tiny decode)"
for m in gpt2_tiny llama_tiny_win; do
  compute-sanitizer --tool memcheck $R $D/art/$m.sparsec --device cuda --bench-decode --prompt-len 10 --max-new-tokens 4 --session-seq 4 --positions 32 2>&1 | grep -E "ERROR SUMMARY" | head -2
  compute-sanitizer --tool racecheck $R $D/art/$m.sparsec --device cuda --bench-decode --prompt-len 10 --max-new-tokens 4 --session-seq 4 --positions 32 2>&1 | grep -E "RACECHECK SUMMARY|ERROR SUMMARY" | head -2
done
mkdir -p /tmp/ck
for m in gpt2 llama; do
  python3 $D/gpu_compare.py make /tmp/ck/$m --family $m && python3 $D/gpu_compare.py pack /tmp/ck/$m $D/art/$m.sparsec || exit 1
  echo "== $m: session vs CPU session (16-token prompt in calls of 5, 6 decode steps)"
  $R $D/art/$m.sparsec --trust --device cuda --bench-decode --prompt-len 16 --max-new-tokens 6 --prefill-rows 5 --compare-cpu --atol 1e-3 --rtol 1e-3 2>&1 | tail -2
  $R $D/art/$m.sparsec --trust --device cuda --bench-decode --prompt-len 128 --max-new-tokens 128 --repeat 3 --profile --json > $OUT/$m-sparsec.json
  python3 -c "
import json; r=json.load(open('$OUT/$m-sparsec.json')); b=r['bench']; json.dump(b['prompt_ids'], open('/tmp/ck/$m-ids.json','w'))
print('sparsec', r['device'], 'decode tok/s %.1f (%.3f ms/token) prefill 128 in %.4f s' % (b['decode_tokens_per_s'], b['decode_ms_per_token'], b['timing']['prefill_s']))
for k,v in sorted(r['profile_ms_per_token'].items(), key=lambda kv:-kv[1]['ms'])[:6]: print('  %-28s %8.4f ms/token %5.1f launches' % (k, v['ms'], v['launches']))"
  timeout 150 python3 $D/gpu_compare.py torch /tmp/ck/$m --prompt-ids /tmp/ck/$m-ids.json --new-tokens 128 --dtype float32 > $OUT/$m-torch-float32.json 2>$OUT/$m-torch.err; echo "torch exit $?"
  python3 -c "
import json; t=json.load(open('$OUT/$m-torch-float32.json')); s=json.load(open('$OUT/$m-sparsec.json'))['bench']['ids']
agree=lambda e: next((i for i,(a,b) in enumerate(zip(s,e)) if a!=b), len(s))
print('$m torch f32 eager %.1f tok/s (greedy ids agree with sparsec %d/128)' % (t['eager_decode_tokens_per_s'], agree(t['eager_ids'])))"
done
