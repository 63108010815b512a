#!/usr/bin/env bash
# ncu kernel durations of a few decode steps (no graphs), base and new.
set -u
D=${D:-.device/v8}; J=/tmp/res; mkdir -p $J /tmp/ck
for f in gpt2 llama; do python3 $D/gpu_compare.py make /tmp/ck/$f --family $f >/dev/null || exit 1; done
for v in base new; do for a in gpt2-f16 llama-bf16; do python3 $D/gpu_compare.py pack /tmp/ck/${a%%-*} $D/$v/$a.sparsec >/dev/null || exit 1; done; done
for v in base new; do for a in gpt2-f16 llama-bf16; do
  timeout 100 ncu --clock-control none --metrics gpu__time_duration.sum --csv $D/$v/sparsec-run $D/$v/$a.sparsec --trust --device cuda --bench-decode --prompt-len 4 --max-new-tokens 3 --no-graphs > $J/ncu-$v-$a.csv 2>$J/ncu-$v-$a.err; echo "ncu $v $a exit $?"
done; done
tar czf $OUT/ncu.tar.gz -C $J .
