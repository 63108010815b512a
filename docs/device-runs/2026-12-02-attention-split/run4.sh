#!/usr/bin/env bash
# Device run (issue 16, twenty-seventh session): the checks of the kept
# prefill attention (`rev`) against the CPU session whose lines run3.sh's
# returned tail left out, with a 513-token prompt in one call as well.
set -u
V=.device/v51; export PYTHONUNBUFFERED=1
R=$V/sparsec-run
for f in gpt2 llama; do python3 $V/gpu_compare.py make /tmp/ck/$f --family $f > /dev/null || exit 1; done
ck() { case $1 in g*) echo /tmp/ck/gpt2;; l*) echo /tmp/ck/llama;; esac; }
for a in g16-rev g16h-rev l16-rev; do
  echo -n "$a vs CPU, 300-token prompt in calls of 100 + 8: "
  $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
  echo -n "$a vs CPU, 513-token prompt in one call + 2: "
  $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 513 --max-new-tokens 2 --positions 1024 --session-seq 1024 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
done
echo done
