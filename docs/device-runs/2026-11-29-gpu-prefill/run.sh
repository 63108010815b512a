#!/usr/bin/env bash
# Device run (issue 16), final: tensor-core matmuls for calls of more than one
# row (one 16x8 tile a warp, TF32 with activations split hi + lo) and the
# row-local tail on the last row for generation's prefill; mid = 7898e8f.
set -u
D=${D:-.device/v12}; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
N=$D/new; R=$N/sparsec-run
echo "== tensor-core kernels vs the interpreter and the CPU"
for a in mma wide2; do for s in 1 2 5 16 17 37 128; do
  echo -n "$a seq $s: "; $R $N/$a.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo
done; done
B="--device cuda --bench-decode --prompt-len 20 --max-new-tokens 12 --prefill-rows 7 --session-seq 32 --positions 32"
for m in gpt2_tiny-f16 llama_tiny-f16 llama_tiny-bf16 gpt2_tiny-f32 llama_tiny-f32; do
  A=$N/$m.sparsec; echo "== $m"
  $R $A $B --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
  $R $A $B --compare-cpu 2>&1 | tail -1
  $R $A --device cuda --seq 30 --check --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -2
  for ss in 32 6; do
    $R $A --device cuda --bench-decode --prompt-len 20 --max-new-tokens 8 --positions 32 --session-seq $ss --json > $J/$m-$ss.json
    $R $A --device cuda --bench-decode --prompt-len 20 --max-new-tokens 8 --positions 32 --session-seq $ss --no-graphs --json > $J/$m-$ss-n.json
    python3 -c "import json;a,b=(json.load(open('$J/$m-$ss'+s+'.json'))['bench'] for s in ['','-n']);print('session seq $ss: graph vs no graph ids equal:',a['ids']==b['ids'],'; device greedy = host argmax:',a['host_argmax_ids_equal'],b['host_argmax_ids_equal'],'; last row alone vs full call:',a['last_row_max_abs_diff'])"
  done
done
echo "== compute-sanitizer"
for m in gpt2_tiny-f16 llama_tiny-bf16; do for t in memcheck racecheck synccheck; do
  echo -n "$m $t: "; compute-sanitizer --tool $t $R $N/$m.sparsec --device cuda --bench-decode --prompt-len 20 --max-new-tokens 3 --session-seq 6 --positions 32 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | head -1
done; done
echo -n "wide2 memcheck: "; compute-sanitizer --tool memcheck $R $N/wide2.sparsec --device cuda --seq 37 2>&1 | grep -E "ERROR SUMMARY" | head -1
for f in gpt2 llama; do python3 $D/gpu_compare.py make /tmp/ck/$f --family $f > /dev/null || exit 1; done
for v in mid new; do for a in gpt2-f16 llama-bf16; do python3 $D/gpu_compare.py pack /tmp/ck/${a%%-*} $D/$v/$a.sparsec > /dev/null || exit 1; done; done
echo "== 124M models: CUDA session vs the CPU session (prefill rows through tensor cores)"
for a in gpt2-f16 llama-bf16; do $R $N/$a.sparsec --trust --device cuda --bench-decode --prompt-len 40 --max-new-tokens 6 --prefill-rows 17 --compare-cpu --atol 1e-3 --rtol 1e-3 2>&1 | tail -1; done
echo "== prefill (128 and 960 tokens) and decode; mid and new alternated"
for r in 1 2; do for v in mid new; do for a in gpt2-f16 llama-bf16; do for p in 128 960; do
  $D/$v/sparsec-run $D/$v/$a.sparsec --trust --device cuda --bench-decode --prompt-len $p --max-new-tokens $([ $p = 960 ] && echo 64 || echo 128) --repeat 5 --positions 1024 --session-seq 1024 --json > $J/$v-$a-$p-$r.json
  python3 -c "import json;b=json.load(open('$J/$v-$a-$p-$r.json'))['bench'];print('$v $a prompt $p round $r: prefill', round(1e3*b['timing']['prefill_s'],2), 'ms', round(b['prefill_tokens_per_s']), 'tok/s; decode', round(b['decode_tokens_per_s'],1), 'tok/s; host argmax', b.get('host_argmax_ids_equal'), '; last row diff', b.get('last_row_max_abs_diff'))"
done; done; done; done
for x in gpt2:f16:float16 llama:bf16:bfloat16; do
  IFS=: read f d t <<< "$x"
  python3 -c "import json;json.dump(json.load(open('$J/new-$f-$d-128-1.json'))['bench']['prompt_ids'],open('/tmp/ck/$f-ids.json','w'))"
  timeout 200 python3 $D/gpu_compare.py torch /tmp/ck/$f --prompt-ids /tmp/ck/$f-ids.json --new-tokens 128 --dtype $t --repeat 5 > $J/$f-torch.json 2>$J/$f-torch.err; echo "torch $f $t exit $?"
  python3 -c "
import json;t=json.load(open('$J/$f-torch.json'));s=json.load(open('$J/new-$f-$d-128-1.json'))['bench']
print({k:round(v,1) for k,v in t.items() if 'per_s' in k})
pre=lambda x,y: next((i for i,(p,q) in enumerate(zip(x,y)) if p!=q), min(len(x),len(y)))
print('sparsec ids equal to torch graph ids for the first', pre(s['ids'], t.get('graph_ids',[])), '; torch graph vs eager', t.get('graph_ids_agree_with_eager'))"
done
tar czf $OUT/results.tar.gz -C $J .
echo done
