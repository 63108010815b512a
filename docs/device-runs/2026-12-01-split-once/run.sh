#!/usr/bin/env bash
# Device run (issue 16, twenty-third session): the tiled tensor-core matmul
# splits each activation into its hi/lo (or half) parts once per block, in
# place in shared memory, instead of once per warp that reads it. `g16`,
# `g16h`, `l16`: the new kernels; `g16o`, `g16ho`, `l16o`: the same commit
# compiled with the per-warp split (a temporary compile-time switch).
# Checks (CPU session, racecheck on 2-layer full-width models), then prefill
# of 512 and 128 rows alternated in three rounds, and PyTorch's prefill.
set -u
V=.device/v39; J=/tmp/res; mkdir -p $J /tmp/ck /tmp/ck2; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
R=$V/sparsec-run
for f in gpt2 llama; do python3 $V/gpu_compare.py make /tmp/ck/$f --family $f > /dev/null || exit 1; done
for f in gpt2 llama; do python3 $V/gpu_compare.py make /tmp/ck2/$f --family $f --layers 2 --vocab 4096 > /dev/null || exit 1; done
ck() { case $1 in g2*) echo /tmp/ck2/gpt2;; l2*) echo /tmp/ck2/llama;; g*) echo /tmp/ck/gpt2;; l*) echo /tmp/ck/llama;; esac; }
echo "== checks"
for a in g16 g16h l16 g16o; do
  echo -n "$a vs CPU, 300-token prompt in calls of 100 + 8: "
  $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
done
for a in g2 g2h l2; do
  echo -n "$a racecheck (300 in calls of 100, + 2): "; s=$(date +%s)
  timeout 150 compute-sanitizer --tool racecheck $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --prefill-rows 100 --max-new-tokens 2 --positions 320 --session-seq 320 > /tmp/$a-race.log 2>&1
  echo "exit $? after $(( $(date +%s) - s )) s: $(grep -E 'RACECHECK SUMMARY' /tmp/$a-race.log | head -1)"
  grep -E "Race|hazard" /tmp/$a-race.log | head -3
done
for a in g2 l2; do
  echo -n "$a memcheck (300 in calls of 100, + 2): "
  timeout 100 compute-sanitizer --tool memcheck $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --prefill-rows 100 --max-new-tokens 2 --positions 320 --session-seq 320 2>&1 | grep -E "ERROR SUMMARY" | head -1
done
bench() { # artifact prompt round
  $R $V/$1.sparsec --weights $(ck $1) --device cuda --bench-decode --prompt-len $2 --max-new-tokens 4 --positions 600 --session-seq 1024 --repeat 5 --json > $J/$1-p$2-$3.json 2>$J/$1-p$2-$3.err
  python3 -c "import json;b=json.load(open('$J/$1-p$2-$3.json'))['bench'];print('$1 prompt $2 r$3: prefill', round(1e3*b['timing']['prefill_s'],3), 'ms')" || tail -2 $J/$1-p$2-$3.err
}
echo "== prefill, new and old alternated, three rounds, medians of 5"
for r in 1 2 3; do for p in 512 128; do for a in g16 g16o g16h g16ho l16 l16o; do bench $a $p $r; done; done; done
echo "== PyTorch prefill on the same weights"
timeout 200 python3 $V/gpu_compare.py torch-prefill /tmp/ck/gpt2 --dtype float16 --lengths 512 > $J/gpt2-torch-prefill.json 2>$J/gpt2-torch-prefill.err; echo "torch-prefill gpt2 exit $?"
timeout 200 python3 $V/gpu_compare.py torch-prefill /tmp/ck/llama --dtype bfloat16 --lengths 512 > $J/llama-torch-prefill.json 2>$J/llama-torch-prefill.err; echo "torch-prefill llama exit $?"
for f in gpt2 llama; do python3 -c "
import json
p=json.load(open('$J/$f-torch-prefill.json'))
print('torch $f prefill 512 eager', round(p.get('eager_512_ms',0),3), 'graph', round(p.get('graph_512_ms',0),3), 'ms')" || tail -3 $J/$f-torch-prefill.err; done
echo "== prefill after PyTorch, one more round"
for a in g16 g16o g16h g16ho l16 l16o; do bench $a 512 4; done
tar czf $OUT/results.tar.gz -C $J .
echo done
