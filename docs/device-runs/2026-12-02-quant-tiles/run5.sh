#!/usr/bin/env bash
# Device run 5 (issue 16, twenty-eighth session): f32 weights with f32 KV
# caches (so attention takes no f16 tensor-core path) against the CPU at
# 1e-4: the kept split with scaled lo parts (`g32`, `l32`) and the unscaled
# one (`g32u`, `l32u`, compiled through a temporary switch, since removed).
set -u
O=.device/v52; V=.device/v56; export PYTHONUNBUFFERED=1
R=$O/sparsec-run
for f in gpt2 llama; do python3 $O/gpu_compare.py make /tmp/ck/$f --family $f > /dev/null || exit 1; done
ck() { case $1 in g*) echo /tmp/ck/gpt2;; l*) echo /tmp/ck/llama;; esac; }
for a in g32 g32u l32 l32u; do
  echo -n "$a vs CPU, 300 in calls of 100 + 8: "
  $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 1e-4 --rtol 1e-4 2>&1 | tail -1
done
echo done
