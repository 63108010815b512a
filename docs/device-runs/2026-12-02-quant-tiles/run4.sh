#!/usr/bin/env bash
# Device run 4 (issue 16, twenty-eighth session): f32 weights on the tiles
# with the lo parts scaled by 2^11 into sums of their own (v55, kept) against
# run3.sh's unscaled split (v54): checks at 1e-4, racecheck/memcheck, prefill.
set -u
O=.device/v52; P=.device/v54; V=.device/v55; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
R=$O/sparsec-run
for f in gpt2 llama; do python3 $O/gpu_compare.py make /tmp/ck/$f --family $f > /dev/null || exit 1; done
python3 $O/gpu_compare.py make /tmp/ck/gpt2l2 --family gpt2 --layers 2 --vocab 4096 > /dev/null || exit 1
ck() { case $1 in *g2*) echo /tmp/ck/gpt2l2;; *g*) echo /tmp/ck/gpt2;; *l*) echo /tmp/ck/llama;; esac; }
bench() { # dir artifact prompt round
  local tag=$(basename $1)-$2
  $R $1/$2.sparsec --weights $(ck $2) --trust --device cuda --bench-decode --prompt-len $3 --max-new-tokens 128 --positions 1024 --session-seq 1024 --repeat 5 --json > $J/$tag-p$3-$4.json 2>$J/$tag-p$3-$4.err
  python3 -c "import json;b=json.load(open('$J/$tag-p$3-$4.json'))['bench'];t=b['timing'];print('$tag p$3 r$4: prefill', round(1e3*t['prefill_s'],3), 'ms; decode', round(t['new_tokens']/t['decode_s'],1), 'tok/s')" || tail -2 $J/$tag-p$3-$4.err
}
echo "== checks (v55)"
for s in 2 37 130 300; do echo -n "filetest seq $s: "; $R $V/ft.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo; done
for a in g32 l32; do
  echo -n "$a vs CPU, 300 in calls of 100 + 8: "
  $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 1e-4 --rtol 1e-4 2>&1 | tail -1
  echo -n "$a vs CPU, 513 in one call + 2: "
  $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 513 --max-new-tokens 2 --positions 1024 --session-seq 1024 --compare-cpu --atol 1e-4 --rtol 1e-4 2>&1 | tail -1
done
for t in racecheck memcheck; do echo -n "g2f32 $t: "; timeout 150 compute-sanitizer --tool $t $R $V/g2f32.sparsec --weights $(ck g2f32) --device cuda --bench-decode --prompt-len 300 --prefill-rows 100 --max-new-tokens 2 --positions 512 --session-seq 512 2>&1 | grep -E "RACECHECK SUMMARY|ERROR SUMMARY" | head -1; echo " (exit ${PIPESTATUS[0]})"; done
echo "== prefill 512, v54 against v55, alternated"
for r in 1 2 3; do for a in g32 l32; do bench $P $a 512 $r; bench $V $a 512 $r; done; done
tar czf $OUT/results.tar.gz -C $J .
echo done
