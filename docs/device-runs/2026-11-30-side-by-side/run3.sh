#!/usr/bin/env bash
# Third call: racecheck on the decode and prefill of both families, on
# 2-layer models of full width (GPT-2 124M's and SmolLM2's layers, a
# 4096-token vocabulary: the same kernels as the full models, fewer layers),
# a 300-token prompt in calls of 100 (tiled tensor-core matmuls, tensor-core
# prefill attention) and 2 decode steps (decode attention split over blocks).
set -u
V=.device/v36; export PYTHONUNBUFFERED=1
R=$V/sparsec-run
for f in gpt2 llama; do python3 $V/gpu_compare.py make /tmp/ck2/$f --family $f --layers 2 --vocab 4096 > /dev/null || exit 1; done
ck() { case $1 in g*) echo /tmp/ck2/gpt2;; l*) echo /tmp/ck2/llama;; esac; }
for a in g2 l2; do
  echo -n "$a vs CPU (300 in calls of 100, + 2): "
  $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --prefill-rows 100 --max-new-tokens 2 --positions 320 --session-seq 320 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
  echo -n "$a racecheck (300 in calls of 100, + 2): "
  s=$(date +%s)
  timeout 250 compute-sanitizer --tool racecheck $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --prefill-rows 100 --max-new-tokens 2 --positions 320 --session-seq 320 > /tmp/$a-race.log 2>&1
  echo "exit $? after $(( $(date +%s) - s )) s: $(grep -E 'RACECHECK SUMMARY' /tmp/$a-race.log | head -1)"
  grep -E "Race|hazard" /tmp/$a-race.log | head -5
done
echo done
