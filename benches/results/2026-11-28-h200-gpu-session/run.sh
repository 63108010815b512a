#!/usr/bin/env bash
# Device run for issue 16: CUDA sessions vs the interpreter and the CPU; a
# GPT-2 124M and a SmolLM2-shaped Llama made here with PyTorch, packed into the
# artifacts compiled on the dev box; sparsec decode against PyTorch.
set -u
D=.h16dev; R=$D/sparsec-run; export PYTHONUNBUFFERED=1
pwd; git log -1 --oneline 2>/dev/null; git branch --show-current 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for m in gpt2_tiny llama_tiny; do
  echo "== $m: session vs interpreter and CPU (10-token prompt in calls of 6, session chunks of 4, 12 decode steps)"
  $R $D/art/$m.sparsec --device cuda --bench-decode --prompt-len 10 --max-new-tokens 12 --prefill-rows 6 --session-seq 4 --positions 32 --check --compare-cpu
  echo "== $m: whole sequence seq 17 --check --compare-cpu"; $R $D/art/$m.sparsec --device cuda --seq 17 --check --compare-cpu | tail -2
done
echo "== memcheck (tiny GPT-2 and Llama decode)"
for m in gpt2_tiny llama_tiny; do compute-sanitizer --tool memcheck $R $D/art/$m.sparsec --device cuda --bench-decode --prompt-len 10 --max-new-tokens 4 --session-seq 4 --positions 32 2>&1 | grep -E "ERROR SUMMARY|error" | head -3; done
mkdir -p /tmp/ck
for m in gpt2 llama; do
  python3 $D/gpu_compare.py make /tmp/ck/$m --family $m && python3 $D/gpu_compare.py pack /tmp/ck/$m $D/art/$m.sparsec || exit 1
done
for m in gpt2 llama; do
  echo "== $m: session vs CPU session (16-token prompt in calls of 5, 6 decode steps; atol 1e-3)"
  $R $D/art/$m.sparsec --trust --device cuda --bench-decode --prompt-len 16 --max-new-tokens 6 --prefill-rows 5 --compare-cpu --atol 1e-3 --rtol 1e-3
  echo "== $m: sparsec decode bench"
  $R $D/art/$m.sparsec --trust --device cuda --bench-decode --prompt-len 128 --max-new-tokens 128 --repeat 3 --json > $OUT/$m-sparsec.json; tail -c 600 $OUT/$m-sparsec.json | head -c 0
  python3 -c "import json,sys; r=json.load(open('$OUT/$m-sparsec.json')); json.dump(r['bench']['prompt_ids'], open('/tmp/ck/$m-ids.json','w')); b=r['bench']; print('sparsec', r['device'], 'decode tok/s %.1f prefill s %.4f arena MB %.1f' % (b['decode_tokens_per_s'], b['timing']['prefill_s'], b['arena_bytes']/1e6))"
  for dt in float32 float16; do
    python3 $D/gpu_compare.py torch /tmp/ck/$m --prompt-ids /tmp/ck/$m-ids.json --new-tokens 128 --dtype $dt > $OUT/$m-torch-$dt.json 2>$OUT/$m-torch-$dt.err; tail -2 $OUT/$m-torch-$dt.err
    python3 -c "import json; t=json.load(open('$OUT/$m-torch-$dt.json')); s=json.load(open('$OUT/$m-sparsec.json'))['bench']['ids']; e=t['eager_ids']; print('torch $dt eager %.1f tok/s, graph %s tok/s; greedy ids agree with sparsec for the first %d of %d' % (t['eager_decode_tokens_per_s'], '%.1f' % t['graph_decode_tokens_per_s'] if 'graph_decode_tokens_per_s' in t else t.get('graph_error'), next((i for i,(a,b) in enumerate(zip(s,e)) if a!=b), len(s)), len(s)))"
  done
done
