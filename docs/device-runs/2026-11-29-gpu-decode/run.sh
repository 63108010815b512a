#!/usr/bin/env bash
# Device run (issue 16): greedy decoding on the device (the decode step and
# the runtime's argmax captured as one graph, replayed back to back, ids copied
# once). base: kernels and runtime before this session; mid: unrolled warp
# GEMV/norms and the bias+residual fusion (b727366), host argmax; new: mid's
# kernels with the device greedy step. GPT-2 124M f16 and SmolLM2-shaped
# Llama bf16 against PyTorch's best on the same weights.
set -u
D=${D:-.device/v9}; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
N=$D/new; R=$N/sparsec-run
B="--device cuda --bench-decode --prompt-len 10 --max-new-tokens 12 --prefill-rows 6 --session-seq 4 --positions 32"
for m in gpt2_tiny-f16 llama_tiny-f16 llama_tiny-bf16 gpt2_tiny-f32 llama_tiny-f32; do
  A=$N/$m.sparsec; echo "== $m"
  $R $A $B --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
  $R $A --device cuda --bench-decode --prompt-len 10 --max-new-tokens 16 --positions 32 --json > $J/$m-g.json
  $R $A --device cuda --bench-decode --prompt-len 10 --max-new-tokens 16 --positions 32 --no-graphs --json > $J/$m-n.json
  python3 -c "import json;a,b=(json.load(open('$J/$m-'+s+'.json'))['bench'] for s in 'gn');print('graph vs no graph ids equal:',a['ids']==b['ids'],'; device greedy = host argmax:',a['host_argmax_ids_equal'],b['host_argmax_ids_equal'])"
done
echo "== compute-sanitizer (greedy steps through the graph)"
for m in gpt2_tiny-f16 llama_tiny-bf16; do
  for t in memcheck racecheck synccheck; do
    echo -n "$m $t: "; compute-sanitizer --tool $t $R $N/$m.sparsec --device cuda --bench-decode --prompt-len 10 --max-new-tokens 4 --session-seq 4 --positions 32 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | head -1
  done
done
for f in gpt2 llama; do python3 $D/gpu_compare.py make /tmp/ck/$f --family $f > /dev/null || exit 1; done
for v in base mid new; do for a in gpt2-f16 llama-bf16; do python3 $D/gpu_compare.py pack /tmp/ck/${a%%-*} $D/$v/$a.sparsec > /dev/null || exit 1; done; done
echo "== decode after a 128-token prompt, 128 new tokens, median of 5 rounds; base, mid, new alternated"
for r in 1 2; do for v in base mid new; do for a in gpt2-f16 llama-bf16; do
  $D/$v/sparsec-run $D/$v/$a.sparsec --trust --device cuda --bench-decode --prompt-len 128 --max-new-tokens 128 --repeat 5 --json > $J/$v-$a-$r.json
  python3 -c "import json;b=json.load(open('$J/$v-$a-$r.json'))['bench'];print('$v $a round $r:', round(b['decode_tokens_per_s'],1), 'tok/s', round(b['decode_ms_per_token'],4), 'ms; prefill', round(1e3*b['timing']['prefill_s'],2), 'ms; host argmax equal:', b.get('host_argmax_ids_equal'))"
done; done; done
for x in gpt2:f16:float16 llama:bf16:bfloat16; do
  IFS=: read f d t <<< "$x"
  python3 -c "import json;json.dump(json.load(open('$J/new-$f-$d-1.json'))['bench']['prompt_ids'],open('/tmp/ck/$f-ids.json','w'))"
  timeout 200 python3 $D/gpu_compare.py torch /tmp/ck/$f --prompt-ids /tmp/ck/$f-ids.json --new-tokens 128 --dtype $t --repeat 5 > $J/$f-torch.json 2>$J/$f-torch.err; echo "torch $f $t exit $?"
  python3 -c "
import json;t=json.load(open('$J/$f-torch.json'));s=json.load(open('$J/new-$f-$d-1.json'))['bench']
print({k:round(v,1) for k,v in t.items() if 'per_s' in k})
ids=t.get('graph_ids') or []
print('sparsec ids equal to torch graph ids:', sum(1 for a,b in zip(ids,s['ids']) if a==b), 'of', len(s['ids']))"
done
echo "== long context: 960-token prompt, 64 new (new, and torch)"
$R $N/gpt2-f16.sparsec --trust --device cuda --bench-decode --prompt-len 960 --max-new-tokens 64 --repeat 3 --positions 1024 --json > $J/gpt2-f16-long.json
python3 -c "import json;b=json.load(open('$J/gpt2-f16-long.json'))['bench'];print('new gpt2-f16 long:', round(b['decode_tokens_per_s'],1), 'tok/s');json.dump(b['prompt_ids'],open('/tmp/ck/long-ids.json','w'))"
timeout 200 python3 $D/gpu_compare.py torch /tmp/ck/gpt2 --prompt-ids /tmp/ck/long-ids.json --new-tokens 64 --dtype float16 --repeat 3 > $J/gpt2-torch-long.json 2>$J/gpt2-torch-long.err; echo "torch gpt2 long exit $?"
python3 -c "import json;t=json.load(open('$J/gpt2-torch-long.json'));print({k:round(v,1) for k,v in t.items() if 'per_s' in k})"
tar czf $OUT/results.tar.gz -C $J .
echo done
