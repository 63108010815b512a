#!/usr/bin/env bash
# Fourth call: where GPT-2's prefill of 512 rows goes, per kernel, on the
# GPU's own clock (ncu gpu__time_duration; ncu serializes the launches, so
# the side-by-side runs are timed one by one): split (g16) and half (g16h)
# activations.
set -u
V=.device/v36; export PYTHONUNBUFFERED=1
R=$V/sparsec-run
python3 $V/gpu_compare.py make /tmp/ck/gpt2 --family gpt2 > /dev/null || exit 1
for a in g16 g16h; do
  timeout 200 ncu --metrics gpu__time_duration.sum --csv --launch-count 200 $R $V/$a.sparsec --weights /tmp/ck/gpt2 --device cuda --bench-decode --prompt-len 512 --max-new-tokens 1 --positions 600 --session-seq 1024 --repeat 1 > $OUT/$a-ncu.csv 2> $OUT/$a-ncu.err
  echo "$a ncu exit $?"
done
echo done
