#!/usr/bin/env bash
# Device run 2 (issue 16, twenty-eighth session): the quantized tiles with
# the quants made f16 by `prmt` and the scales loaded first (v53, kept)
# against run.sh's form (v52: shifts and masks, scales loaded after the
# MMAs); the warp-GEMV artifacts again, this time first; `half` activations
# over Q8_0. Checks and sanitizers of the kept form.
set -u
O=.device/v52; V=.device/v53; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
R=$O/sparsec-run
for f in gpt2 llama; do python3 $O/gpu_compare.py make /tmp/ck/$f --family $f > /dev/null || exit 1; done
python3 $O/gpu_compare.py make /tmp/ck/gpt2l2 --family gpt2 --layers 2 --vocab 4096 > /dev/null || exit 1
python3 $O/gpu_compare.py make /tmp/ck/llamal2 --family llama --layers 2 --vocab 4096 > /dev/null || exit 1
ck() { case $1 in *g2*) echo /tmp/ck/gpt2l2;; *l2*) echo /tmp/ck/llamal2;; *g*) echo /tmp/ck/gpt2;; *l*) echo /tmp/ck/llama;; esac; }
bench() { # dir artifact prompt round
  local tag=$(basename $1)-$2
  $R $1/$2.sparsec --weights $(ck $2) --trust --device cuda --bench-decode --prompt-len $3 --max-new-tokens 128 --positions 1024 --session-seq 1024 --repeat 5 --json > $J/$tag-p$3-$4.json 2>$J/$tag-p$3-$4.err
  python3 -c "import json;b=json.load(open('$J/$tag-p$3-$4.json'))['bench'];t=b['timing'];print('$tag p$3 r$4: prefill', round(1e3*t['prefill_s'],3), 'ms; decode', round(t['new_tokens']/t['decode_s'],1), 'tok/s')" || tail -2 $J/$tag-p$3-$4.err
}
echo "== checks (v53)"
for s in 2 37 130 300; do echo -n "filetest seq $s: "; $R $V/ft.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo; done
for a in gq8 gq4 lq8 lq4 gq8h; do
  tol=2e-3; [ $a = gq8h ] && tol=5e-2
  echo -n "$a vs CPU, 300 in calls of 100 + 8: "
  $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol $tol --rtol $tol 2>&1 | tail -1
  echo -n "$a vs CPU, 513 in one call + 2: "
  $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 513 --max-new-tokens 2 --positions 1024 --session-seq 1024 --compare-cpu --atol $tol --rtol $tol 2>&1 | tail -1
done
echo "== the warp GEMV first"
for a in gq8-old gq4-old lq4-old; do bench $O $a 512 0; done
echo "== v52 against v53, 512 rows, medians of 5, alternated"
for r in 1 2 3; do for a in gq8 gq4 lq8 lq4; do bench $O $a 512 $r; bench $V $a 512 $r; done; bench $V gq8h 512 $r; bench $O g16 512 $r; done
echo "== 128 rows"
for a in gq8 gq4 lq8 lq4; do bench $V $a 128 1; done
python3 - <<'PY'
import json
for a in ['gq8','gq4','lq8','lq4']:
    x=json.load(open(f'/tmp/res/v52-{a}-p512-1.json'))['bench']['ids']; y=json.load(open(f'/tmp/res/v53-{a}-p512-1.json'))['bench']['ids']
    print(a, 'v53 ids equal v52:', x == y, len(x))
PY
echo "== sanitizers (v53, 2-layer models, 300 in calls of 100, + 2)"
for a in g2q4 l2q8; do for t in racecheck memcheck; do echo -n "$a $t: "; timeout 150 compute-sanitizer --tool $t $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --prefill-rows 100 --max-new-tokens 2 --positions 512 --session-seq 512 2>&1 | grep -E "RACECHECK SUMMARY|ERROR SUMMARY" | head -1; echo " (exit ${PIPESTATUS[0]})"; done; done
tar czf $OUT/results.tar.gz -C $J .
echo done
