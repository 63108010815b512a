#!/usr/bin/env bash
# Ninth call: new7 = new6 with the two accumulator sets only at 32-row tiles
# (new6's 64-row tiles held 16 more registers, and the decode GEMV sharing
# their kernel lost 3%). Checks and new3 against new7.
set -u
D=${D:-.device/v20}; J=/tmp/res9; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
R=$D/new3/sparsec-run; N=$D/new7
for a in tiled wide2; do for s in 2 37 65 300; do
  echo -n "new7 $a seq $s: "; $R $N/$a.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo
done; done
python3 $D/gpu_compare.py make /tmp/ck/gpt2 --family gpt2 > /dev/null || exit 1
python3 $D/gpu_compare.py make /tmp/ck/llama --family llama > /dev/null || exit 1
ck() { case $1 in g16) echo /tmp/ck/gpt2;; l16) echo /tmp/ck/llama;; esac; }
for a in g16 l16; do echo -n "new7 $a 300 in calls of 100 +8 vs CPU: "; $R $N/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1; done
bench() { # version model prompt new positions tag
  $R $D/$1/$2.sparsec --weights $(ck $2) --device cuda --bench-decode --prompt-len $3 --max-new-tokens $4 --positions $5 --session-seq 1024 --repeat 5 --json > $J/$1-$2-$6.json 2>$J/$1-$2-$6.err
  python3 -c "import json;b=json.load(open('$J/$1-$2-$6.json'))['bench'];print('$1 $2 prompt $3:', round(b['decode_tokens_per_s'],1), 'tok/s; prefill', round(1e3*b['timing']['prefill_s'],2), 'ms')" || tail -2 $J/$1-$2-$6.err
}
for r in 1 2; do for v in new3 new7; do for a in g16 l16; do
  bench $v $a 128 128 300 p128-$r; bench $v $a 512 64 600 p512-$r; bench $v $a 960 32 1000 p960-$r
done; done; done
tar czf $OUT/results9.tar.gz -C $J .
echo done
