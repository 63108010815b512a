#!/usr/bin/env bash
# Fourth call: sanitizers over prefill (the tiled tensor-core path) and decode
# of both families with this session's kernels (v31), and the dense / 90%
# sparse GPT-2 decode comparison again in a fresh call.
set -u
A=.device/v30; B=.device/v31; J=/tmp/res3; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
R=$B/sparsec-run
for f in gpt2 llama; do python3 $B/gpu_compare.py make /tmp/ck/$f --family $f > /dev/null || exit 1; done
ck() { case $1 in g*) echo /tmp/ck/gpt2;; l*) echo /tmp/ck/llama;; esac; }
san() { # tool artifact prompt rows new timeout
  echo -n "v31 $2 $1 (prompt $3 in calls of $4, + $5): "
  timeout $6 compute-sanitizer --tool $1 $R $B/$2.sparsec --weights $(ck $2) --device cuda --bench-decode --prompt-len $3 --prefill-rows $4 --max-new-tokens $5 --positions 64 --session-seq 64 2>&1 | grep -E "RACECHECK SUMMARY|ERROR SUMMARY" | head -1
  echo " (exit ${PIPESTATUS[0]})"
}
for a in l16 g90 g16; do san memcheck $a 40 20 2 90; san synccheck $a 40 20 2 90; done
for a in l16 g16; do san racecheck $a 8 4 1 120; done
bench() { # dir artifact tag round
  $R $1/$2.sparsec --weights $(ck $2) --device cuda --bench-decode --prompt-len 128 --max-new-tokens 128 --positions 300 --session-seq 1024 --repeat 5 --json > $J/$2-$3-$4.json 2>$J/$2-$3-$4.err
  python3 -c "import json;b=json.load(open('$J/$2-$3-$4.json'))['bench'];print('$2 $3 r$4:', round(b['decode_tokens_per_s'],1), 'tok/s')" || tail -2 $J/$2-$3-$4.err
}
echo "== decode after 128 tokens, 128 new, medians of 5; three rounds"
for r in 1 2 3; do bench $A g16 v30 $r; bench $B g16 v31 $r; bench $B g90 v31 $r; done
tar czf $OUT/results3.tar.gz -C $J .
echo done
