#!/usr/bin/env bash
# Fifth call: decode at batch 1 after a 128-token prompt, 128 new tokens, with
# the current kernels (v23/f16 = 7f307ee's artifacts, the default split mode),
# against PyTorch eager and PyTorch's best (a static-cache decode step captured
# as a CUDA graph, gpu_compare.py torch) on the same weights and prompt ids.
set -u
D=.device/v22; E=.device/v23; J=/tmp/res5; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
R=$D/sparsec-run
python3 $D/gpu_compare.py make /tmp/ck/gpt2 --family gpt2 > /dev/null || exit 1
python3 $D/gpu_compare.py make /tmp/ck/llama --family llama > /dev/null || exit 1
ck() { case $1 in g16) echo /tmp/ck/gpt2;; l16) echo /tmp/ck/llama;; esac; }
for r in 1 2; do for a in g16 l16; do
  $R $E/f16/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 128 --max-new-tokens 128 --positions 300 --repeat 5 --json > $J/$a-$r.json 2>$J/$a-$r.err
  python3 -c "import json;b=json.load(open('$J/$a-$r.json'))['bench'];print('$a round $r:', round(b['decode_tokens_per_s'],1), 'tok/s decode')" || tail -2 $J/$a-$r.err
done; done
for x in g16:gpt2:float16 l16:llama:bfloat16; do IFS=: read a f t <<< "$x"
  python3 -c "import json;json.dump(json.load(open('$J/$a-1.json'))['bench']['prompt_ids'],open('/tmp/ck/$f-ids.json','w'))"
  timeout 240 python3 $D/gpu_compare.py torch /tmp/ck/$f --prompt-ids /tmp/ck/$f-ids.json --new-tokens 128 --dtype $t --repeat 5 > $J/$f-torch.json 2>$J/$f-torch.err; echo "torch $f exit $?"
  python3 - $J/$a-1.json $J/$f-torch.json <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))['bench']; t = json.load(open(sys.argv[2]))
ids = s['ids']
def agree(o): return next((i for i, (p, q) in enumerate(zip(ids, o)) if p != q), min(len(ids), len(o)))
print(' torch eager', round(t.get('eager_decode_tokens_per_s', 0), 1), 'graph', round(t.get('graph_decode_tokens_per_s', 0), 1), 'tok/s;',
      'sparsec ids agree with eager for', agree(t.get('eager_ids', [])), 'and graph for', agree(t.get('graph_ids', [])), 'of', len(ids), t.get('graph_error', ''))
PY
done
tar czf $OUT/results5.tar.gz -C $J .
echo done
