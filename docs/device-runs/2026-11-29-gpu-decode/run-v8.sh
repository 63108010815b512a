#!/usr/bin/env bash
# Device run (issue 16): unrolled warp GEMV and warp norms, bias+residual fused
# into the matmul's stores. Correctness (kernels vs the interpreter and the CPU,
# tiny models' sessions, sanitizers), then GPT-2 124M f16 and SmolLM2-shaped
# Llama bf16 decode, before (base/) and after (new/) in one run, PyTorch best on
# the same weights, and ncu kernel times of a decode step.
set -u
D=${D:-.device/v8}; J=$OUT/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
N=$D/new; R=$N/sparsec-run
echo "== kernels vs the interpreter and the CPU (seq 1 and 5)"
for a in wide lower-matmul-quantized lower-layer-norm lower-rms-norm lower-fusion-bias-residual lower-fusion lower-fusion-activation lower-matmul-half lower-matmul-transposed lower-matmul-transposed-vector; do
  for s in 1 5; do echo -n "$a seq $s: "; $R $N/$a.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | grep -E "check_reference|compare_cpu|rror" | tr '\n' ' '; echo; done
done
B="--device cuda --bench-decode --prompt-len 10 --max-new-tokens 12 --prefill-rows 6 --session-seq 4 --positions 32"
for m in gpt2_tiny-f16 llama_tiny-f16 llama_tiny-bf16 gpt2_tiny-f32 llama_tiny-f32; do
  A=$N/$m.sparsec; echo "== $m"
  $R $A $B --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
  $R $A $B --compare-cpu 2>&1 | tail -1
  $R $A --device cuda --seq 17 --check --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -2
  $R $A --device cuda --bench-decode --prompt-len 10 --max-new-tokens 16 --positions 32 --json > $J/$m-g.json
  $R $A --device cuda --bench-decode --prompt-len 10 --max-new-tokens 16 --positions 32 --no-graphs --json > $J/$m-n.json
  python3 -c "import json;a,b=(json.load(open('$J/$m-'+s+'.json'))['bench']['ids'] for s in 'gn');print('graph vs no graph ids equal:',a==b)"
done
echo "== compute-sanitizer"
for m in gpt2_tiny-f16 llama_tiny-bf16 llama_tiny-f32; do
  for t in memcheck racecheck; do
    echo -n "$m $t: "; compute-sanitizer --tool $t $R $N/$m.sparsec --device cuda --bench-decode --prompt-len 10 --max-new-tokens 4 --session-seq 4 --positions 32 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | head -1
  done
done
for a in wide; do echo -n "$a memcheck: "; compute-sanitizer --tool memcheck $R $N/$a.sparsec --device cuda --seq 3 2>&1 | grep -E "ERROR SUMMARY" | head -1; done
for f in gpt2 llama; do python3 $D/gpu_compare.py make /tmp/ck/$f --family $f || exit 1; done
for v in base new; do for a in gpt2-f16 llama-bf16; do python3 $D/gpu_compare.py pack /tmp/ck/${a%%-*} $D/$v/$a.sparsec || exit 1; done; done
echo "== 124M models: CUDA session vs the CPU session (new)"
for a in gpt2-f16 llama-bf16; do $R $N/$a.sparsec --trust --device cuda --bench-decode --prompt-len 16 --max-new-tokens 6 --prefill-rows 5 --compare-cpu --atol 1e-3 --rtol 1e-3 2>&1 | tail -1; done
echo "== decode after a 128-token prompt, base and new alternated"
for r in 1 2; do for v in base new; do for a in gpt2-f16 llama-bf16; do
  $D/$v/sparsec-run $D/$v/$a.sparsec --trust --device cuda --bench-decode --prompt-len 128 --max-new-tokens 128 --repeat 5 --json > $J/$v-$a-$r.json
  python3 -c "import json;b=json.load(open('$J/$v-$a-$r.json'))['bench'];print('$v $a round $r:', round(b['decode_tokens_per_s'],1), 'tok/s', round(b['decode_ms_per_token'],4), 'ms; prefill', round(1e3*b['timing']['prefill_s'],2), 'ms')"
done; done; done
for x in gpt2:f16:float16 llama:bf16:bfloat16; do
  IFS=: read f d t <<< "$x"
  python3 -c "import json;json.dump(json.load(open('$J/new-$f-$d-1.json'))['bench']['prompt_ids'],open('/tmp/ck/$f-ids.json','w'))"
  timeout 200 python3 $D/gpu_compare.py torch /tmp/ck/$f --prompt-ids /tmp/ck/$f-ids.json --new-tokens 128 --dtype $t --repeat 5 > $J/$f-torch.json 2>$J/$f-torch.err; echo "torch $f $t exit $?"
  python3 -c "
import json;t=json.load(open('$J/$f-torch.json'));s=json.load(open('$J/new-$f-$d-1.json'))['bench']
print({k:v for k,v in t.items() if 'per_s' in k})
ids=t.get('graph_ids') or t.get('ids') or []
print('greedy ids equal to torch graph:', sum(1 for a,b in zip(ids,s['ids']) if a==b), 'of', len(s['ids']))"
done
echo "== ncu: kernel times of decode steps (no graphs; 4-token prompt, 3 new)"
for v in base new; do for a in gpt2-f16 llama-bf16; do
  timeout 100 ncu --clock-control none --metrics gpu__time_duration.sum --csv $D/$v/sparsec-run $D/$v/$a.sparsec --trust --device cuda --bench-decode --prompt-len 4 --max-new-tokens 3 --no-graphs > $J/ncu-$v-$a.csv 2>$J/ncu-$v-$a.err; echo "ncu $v $a exit $?"
done; done
echo done
