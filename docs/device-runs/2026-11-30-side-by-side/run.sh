#!/usr/bin/env bash
# Device run (issue 16, twenty-first session): consecutive kernels that touch
# disjoint memory (q, k, v; gate, up) launch side by side on forked streams
# (runtime/src/cuda_side.rs), in captured decode graphs as parallel branches.
# Checks with it on (CPU session, sanitizers, greedy ids on against off),
# then prefill of 512 and decode after 128 with it on (`on`) and off
# (`--no-side-by-side`, `off`) alternated, and PyTorch's prefill in the same call.
set -u
V=.device/v34; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
R=$V/sparsec-run
for f in gpt2 llama; do python3 $V/gpu_compare.py make /tmp/ck/$f --family $f > /dev/null || exit 1; done
ck() { case $1 in g*) echo /tmp/ck/gpt2;; l*) echo /tmp/ck/llama;; esac; }
echo "== checks, side by side on"
for a in g16 g16h l16; do
  echo -n "$a vs CPU, 300-token prompt in calls of 100 + 8: "
  $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
done
for a in g16 l16; do for t in memcheck synccheck; do
  echo -n "$a $t (40 in calls of 20, + 2): "; timeout 90 compute-sanitizer --tool $t $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 40 --prefill-rows 20 --max-new-tokens 2 --positions 64 --session-seq 64 2>&1 | grep -E "ERROR SUMMARY" | head -1; echo " (exit ${PIPESTATUS[0]})"
done; done
echo -n "g16 racecheck (4 + 2): "; timeout 100 compute-sanitizer --tool racecheck $R $V/g16.sparsec --weights /tmp/ck/gpt2 --device cuda --bench-decode --prompt-len 4 --max-new-tokens 2 --positions 32 2>&1 | grep -E "RACECHECK SUMMARY" | head -1; echo " (exit ${PIPESTATUS[0]})"
bench() { # artifact prompt new positions mode round
  local flag=""; [ $5 = off ] && flag=--no-side-by-side
  $R $V/$1.sparsec --weights $(ck $1) --device cuda --bench-decode --prompt-len $2 --max-new-tokens $3 --positions $4 --session-seq 1024 --repeat 5 $flag --json > $J/$1-p$2-$5-$6.json 2>$J/$1-p$2-$5-$6.err
  python3 -c "import json;b=json.load(open('$J/$1-p$2-$5-$6.json'))['bench'];print('$1 prompt $2 $5 r$6:', round(b['decode_tokens_per_s'],1), 'tok/s; prefill', round(1e3*b['timing']['prefill_s'],3), 'ms; side-by-side runs', b.get('side_by_side_runs'))" || tail -2 $J/$1-p$2-$5-$6.err
}
echo "== prefill of 512 (8 new) and decode after 128 (128 new), on/off alternated, three rounds, medians of 5"
for r in 1 2 3; do for m in on off; do
  for a in g16 g16h l16; do bench $a 512 8 600 $m $r; done
  for a in g16 l16; do bench $a 128 128 300 $m $r; done
done; done
python3 - <<'PY'
import json
for a, p in [('g16',128),('l16',128),('g16',512),('l16',512),('g16h',512)]:
    x=json.load(open(f'/tmp/res/{a}-p{p}-on-1.json'))['bench']['ids']; y=json.load(open(f'/tmp/res/{a}-p{p}-off-1.json'))['bench']['ids']
    print(a, p, 'on ids equal off ids for the first', next((i for i,(u,v) in enumerate(zip(x,y)) if u!=v), len(x)), 'of', len(x))
PY
echo "== PyTorch prefill on the same weights"
timeout 200 python3 $V/gpu_compare.py torch-prefill /tmp/ck/gpt2 --dtype float16 --lengths 512 > $J/gpt2-torch-prefill.json 2>$J/gpt2-torch-prefill.err; echo "torch-prefill gpt2 exit $?"
timeout 200 python3 $V/gpu_compare.py torch-prefill /tmp/ck/llama --dtype bfloat16 --lengths 512 > $J/llama-torch-prefill.json 2>$J/llama-torch-prefill.err; echo "torch-prefill llama exit $?"
for f in gpt2 llama; do python3 -c "
import json
p=json.load(open('$J/$f-torch-prefill.json'))
print('torch $f prefill 512 eager', round(p.get('eager_512_ms',0),3), 'graph', round(p.get('graph_512_ms',0),3), 'ms')" || tail -3 $J/$f-torch-prefill.err; done
tar czf $OUT/results.tar.gz -C $J .
echo done
