#!/usr/bin/env bash
# Device run (issue 16): f16/bf16 weights, f16 KV caches, pos in device memory,
# the decode step as a CUDA graph. Tiny models: sessions vs the interpreter and
# the CPU, graph vs no graph, memcheck/racecheck; GPT-2 124M (f16) and the
# SmolLM2-shaped Llama (bf16) against PyTorch eager and a CUDA-graph static-cache
# decode on the same weights. Run from the repository root; D names the folder
# that holds sparsec-run, gpu_compare.py, this script, summary.py and art/.
set -u
D=${D:-.device}; R=$D/sparsec-run; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
B="--device cuda --bench-decode --prompt-len 10 --max-new-tokens 12 --prefill-rows 6 --session-seq 4 --positions 32"
for m in gpt2_tiny-f16 llama_tiny-f16 llama_tiny-bf16 gpt2_tiny-f32 llama_tiny-f32; do
  A=$D/art/$m.sparsec; echo "== $m"
  $R $A $B --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
  $R $A $B --compare-cpu 2>&1 | tail -1
  $R $A --device cuda --seq 17 --check --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -2
  $R $A --device cuda --bench-decode --prompt-len 10 --max-new-tokens 16 --positions 32 --json > $J/$m-g.json
  $R $A --device cuda --bench-decode --prompt-len 10 --max-new-tokens 16 --positions 32 --no-graphs --json > $J/$m-n.json
  python3 -c "import json;a,b=(json.load(open('$J/$m-'+s+'.json'))['bench']['ids'] for s in 'gn');print('graph vs no graph ids equal:',a==b)"
done
echo "== compute-sanitizer (prefill of 10 in calls of 4, 4 decode steps through the graph)"
for m in gpt2_tiny-f16 llama_tiny-bf16 llama_tiny-f32; do
  for t in memcheck racecheck; do
    echo -n "$m $t: "; compute-sanitizer --tool $t $R $D/art/$m.sparsec --device cuda --bench-decode --prompt-len 10 --max-new-tokens 4 --session-seq 4 --positions 32 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | head -1
  done
done
for f in gpt2 llama; do python3 $D/gpu_compare.py make /tmp/ck/$f --family $f || exit 1; done
for a in gpt2-f16 llama-bf16 gpt2-f32 llama-f32; do
  f=${a%%-*}; A=$D/art/$a.sparsec; python3 $D/gpu_compare.py pack /tmp/ck/$f $A || exit 1
  echo "== $a"
  case $a in *f32) ;; *) $R $A --trust --device cuda --bench-decode --prompt-len 16 --max-new-tokens 6 --prefill-rows 5 --compare-cpu --atol 1e-3 --rtol 1e-3 2>&1 | tail -1;; esac
  $R $A --trust --device cuda --bench-decode --prompt-len 128 --max-new-tokens 128 --repeat 5 --json > $J/$a-g.json
  $R $A --trust --device cuda --bench-decode --prompt-len 128 --max-new-tokens 128 --repeat 5 --no-graphs --profile --json > $J/$a-n.json
done
for x in gpt2:f16:float16 llama:bf16:bfloat16; do
  IFS=: read f d t <<< "$x"
  python3 -c "import json;json.dump(json.load(open('$J/$f-$d-g.json'))['bench']['prompt_ids'],open('/tmp/ck/$f-ids.json','w'))"
  timeout 200 python3 $D/gpu_compare.py torch /tmp/ck/$f --prompt-ids /tmp/ck/$f-ids.json --new-tokens 128 --dtype $t --repeat 5 > $J/$f-torch.json 2>$J/$f-torch.err; echo "torch $f $t exit $?"
done
echo "== long context: GPT-2 f16, 960-token prompt, 64 new tokens"
$R $D/art/gpt2-f16.sparsec --trust --device cuda --bench-decode --prompt-len 960 --max-new-tokens 64 --repeat 3 --positions 1024 --json > $J/gpt2-f16-long.json
python3 -c "import json;json.dump(json.load(open('$J/gpt2-f16-long.json'))['bench']['prompt_ids'],open('/tmp/ck/long-ids.json','w'))"
timeout 200 python3 $D/gpu_compare.py torch /tmp/ck/gpt2 --prompt-ids /tmp/ck/long-ids.json --new-tokens 64 --dtype float16 --repeat 3 > $J/gpt2-torch-long.json 2>$J/gpt2-torch-long.err; echo "torch gpt2 long exit $?"
tar czf $OUT/results.tar.gz -C $J .
python3 $D/summary.py $J $D/art
