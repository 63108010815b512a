#!/usr/bin/env bash
# Fifth call: 64-row tiles also for deep matmuls narrower than 1024 (k >=
# 2048: GPT-2's MLP down projection, `k2048`; k >= 1536: SmolLM2's as well,
# `k1536`; SPARSEC_DEEP64 at compile time) against 32-row tiles (v34's).
set -u
V=.device/v37; J=/tmp/res5; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
R=$V/sparsec-run
for f in gpt2 llama; do python3 $V/gpu_compare.py make /tmp/ck/$f --family $f > /dev/null || exit 1; done
ck() { case $1 in g*) echo /tmp/ck/gpt2;; l*) echo /tmp/ck/llama;; esac; }
for a in g16k2048 g16hk2048 l16k1536; do
  echo -n "$a vs CPU, 300-token prompt in calls of 100 + 8: "
  $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
done
bench() { # artifact prompt round
  $R $V/$1.sparsec --weights $(ck $1) --device cuda --bench-decode --prompt-len $2 --max-new-tokens 4 --positions 600 --session-seq 1024 --repeat 5 --json > $J/$1-p$2-$3.json 2>$J/$1-p$2-$3.err
  python3 -c "import json;b=json.load(open('$J/$1-p$2-$3.json'))['bench'];print('$1 prompt $2 r$3: prefill', round(1e3*b['timing']['prefill_s'],3), 'ms')" || tail -2 $J/$1-p$2-$3.err
}
for r in 1 2 3; do for p in 512 128; do for a in g16 g16k2048 g16h g16hk2048 l16 l16k1536; do bench $a $p $r; done; done; done
tar czf $OUT/results5.tar.gz -C $J .
echo done
