#!/usr/bin/env bash
# Device run 4 for issue 16: where sparsec's decode time goes (per-kernel
# profile) and PyTorch's best (static cache + torch.compile reduce-overhead).
set -u
D=.h16dev; R=$D/sparsec-run; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
mkdir -p /tmp/ck
for m in gpt2 llama; do
  python3 $D/gpu_compare.py make /tmp/ck/$m --family $m && python3 $D/gpu_compare.py pack /tmp/ck/$m $D/art/$m.sparsec || exit 1
  echo "== $m: sparsec decode bench + profile"
  $R $D/art/$m.sparsec --trust --device cuda --bench-decode --prompt-len 128 --max-new-tokens 128 --repeat 3 --profile --json > $OUT/$m-sparsec.json
  python3 -c "
import json; r=json.load(open('$OUT/$m-sparsec.json')); b=r['bench']; json.dump(b['prompt_ids'], open('/tmp/ck/$m-ids.json','w'))
print('sparsec', r['device'], 'decode tok/s %.1f (%.3f ms/token) prefill 128 in %.4f s' % (b['decode_tokens_per_s'], b['decode_ms_per_token'], b['timing']['prefill_s']))
for k,v in sorted(r['profile_ms_per_token'].items(), key=lambda kv:-kv[1]['ms']): print('  %-28s %8.4f ms/token %5.1f launches' % (k, v['ms'], v['launches']))"
done
for m in gpt2 llama; do
  timeout 200 python3 $D/gpu_compare.py torch /tmp/ck/$m --prompt-ids /tmp/ck/$m-ids.json --new-tokens 128 --dtype float32 > $OUT/$m-torch-float32.json 2>$OUT/$m-torch.err; echo "torch exit $?"
  python3 -c "
import json; t=json.load(open('$OUT/$m-torch-float32.json')); s=json.load(open('$OUT/$m-sparsec.json'))['bench']['ids']
agree=lambda e: next((i for i,(a,b) in enumerate(zip(s,e)) if a!=b), len(s))
print('$m torch f32 eager %.1f tok/s (ids agree %d/128); compiled %s' % (t['eager_decode_tokens_per_s'], agree(t['eager_ids']), ('%.1f tok/s (ids agree %d/128)' % (t['compiled_decode_tokens_per_s'], agree(t['compiled_ids']))) if 'compiled_decode_tokens_per_s' in t else t.get('compiled_error')))"
done
