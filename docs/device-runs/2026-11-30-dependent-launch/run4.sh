#!/usr/bin/env bash
# Fifth call: the tiled tensor-core prefill matmul takes two k-tiles between
# barriers at 32-row tiles (a ring of 4 stages; v32) against one (v31, and
# v30 for half activations: the same prefill kernels). Checks of the filetest
# graph at several row counts and of the models, sanitizers, then prefill.
set -u
A=.device/v30; B=.device/v31; C=.device/v32; J=/tmp/res4; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
R=$C/sparsec-run
for f in gpt2 llama; do python3 $C/gpu_compare.py make /tmp/ck/$f --family $f > /dev/null || exit 1; done
ck() { case $1 in g*) echo /tmp/ck/gpt2;; l*) echo /tmp/ck/llama;; esac; }
for s in 2 37 130 300 513; do
  echo -n "mt seq $s: "; $R $C/mt.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo
  echo -n "mth seq $s (5e-2): "; $R $C/mth.sparsec --device cuda --seq $s --check --compare-cpu --atol 5e-2 --rtol 5e-2 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo
done
for t in memcheck racecheck synccheck; do echo -n "mt seq 300 $t: "; timeout 120 compute-sanitizer --tool $t $R $C/mt.sparsec --device cuda --seq 300 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | head -1; echo; done
for a in g16 g16h l16; do
  echo -n "v32 $a vs CPU, 300 in calls of 100 + 8: "
  $R $C/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
done
bench() { # dir artifact tag prompt round
  $R $1/$2.sparsec --weights $(ck $2) --device cuda --bench-decode --prompt-len $4 --max-new-tokens 8 --positions 1100 --session-seq 1024 --repeat 5 --json > $J/$2-$3-p$4-$5.json 2>$J/$2-$3-p$4-$5.err
  python3 -c "import json;b=json.load(open('$J/$2-$3-p$4-$5.json'))['bench'];print('$2 $3 prompt $4 r$5: prefill', round(1e3*b['timing']['prefill_s'],3), 'ms')" || tail -2 $J/$2-$3-p$4-$5.err
}
echo "== prefill (ms, medians of 5), old / new alternated, two rounds"
for r in 1 2; do for p in 128 512 960; do
  bench $B g16 old $p $r; bench $C g16 new $p $r
  bench $A g16h old $p $r; bench $C g16h new $p $r
  bench $B l16 old $p $r; bench $C l16 new $p $r
done; done
tar czf $OUT/results4.tar.gz -C $J .
echo done
