#!/usr/bin/env bash
# Sixth call: half activations with pairs of k-tiles and four accumulator
# chains (2 per k-tile; v33) against one k-tile a barrier (v30, the kept
# form) and pairs with two chains (v32, measured slower in run4).
set -u
A=.device/v30; B=.device/v32; C=.device/v33; J=/tmp/res5; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
R=$C/sparsec-run
python3 $C/gpu_compare.py make /tmp/ck/gpt2 --family gpt2 > /dev/null || exit 1
for s in 2 37 300 513; do echo -n "v33 mth seq $s (5e-2): "; $R $C/mth.sparsec --device cuda --seq $s --check --compare-cpu --atol 5e-2 --rtol 5e-2 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo; done
echo -n "v33 g16h vs CPU, 300 in calls of 100 + 8: "
$R $C/g16h.sparsec --weights /tmp/ck/gpt2 --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
bench() { # dir tag prompt round
  $R $1/g16h.sparsec --weights /tmp/ck/gpt2 --device cuda --bench-decode --prompt-len $3 --max-new-tokens 8 --positions 1100 --session-seq 1024 --repeat 5 --json > $J/$2-p$3-$4.json 2>$J/$2-p$3-$4.err
  python3 -c "import json;b=json.load(open('$J/$2-p$3-$4.json'))['bench'];print('g16h $2 prompt $3 r$4: prefill', round(1e3*b['timing']['prefill_s'],3), 'ms')" || tail -2 $J/$2-p$3-$4.err
}
for r in 1 2 3; do for p in 128 512 960; do bench $A one $p $r; bench $B pair2 $p $r; bench $C pair4 $p $r; done; done
tar czf $OUT/results5.tar.gz -C $J .
echo done
