#!/usr/bin/env bash
# Device run 6 (issue 16, twenty-eighth session): the quantized warp GEMV
# (decode) reading 16 bytes of quants a lane step (Q8_0 half a block, Q4 a
# block) with the activations as 16-byte loads and one scale per run (v57)
# against one value a lane step (v53); checks at 1 row and more, sanitizers,
# decode alternated.
set -u
O=.device/v52; P=.device/v53; V=.device/v57; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
R=$O/sparsec-run
for f in gpt2 llama; do python3 $O/gpu_compare.py make /tmp/ck/$f --family $f > /dev/null || exit 1; done
python3 $O/gpu_compare.py make /tmp/ck/gpt2l2 --family gpt2 --layers 2 --vocab 4096 > /dev/null || exit 1
ck() { case $1 in *g2*) echo /tmp/ck/gpt2l2;; *g*) echo /tmp/ck/gpt2;; *l*) echo /tmp/ck/llama;; esac; }
bench() { # dir artifact prompt round
  local tag=$(basename $1)-$2
  $R $1/$2.sparsec --weights $(ck $2) --trust --device cuda --bench-decode --prompt-len $3 --max-new-tokens 128 --positions 1024 --session-seq 1024 --repeat 5 --json > $J/$tag-p$3-$4.json 2>$J/$tag-p$3-$4.err
  python3 -c "import json;b=json.load(open('$J/$tag-p$3-$4.json'))['bench'];t=b['timing'];print('$tag p$3 r$4: prefill', round(1e3*t['prefill_s'],3), 'ms; decode', round(t['new_tokens']/t['decode_s'],1), 'tok/s')" || tail -2 $J/$tag-p$3-$4.err
}
echo "== checks (v57)"
for f in ftq ft; do for s in 1 2 37 130; do echo -n "$f seq $s: "; $R $V/$f.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo; done; done
for a in gq8 gq4 lq8 lq4; do
  echo -n "$a vs CPU, 300 in calls of 100 + 8: "
  $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
done
for t in racecheck memcheck; do echo -n "g2q4 $t: "; timeout 150 compute-sanitizer --tool $t $R $V/g2q4.sparsec --weights $(ck g2q4) --device cuda --bench-decode --prompt-len 300 --prefill-rows 100 --max-new-tokens 2 --positions 512 --session-seq 512 2>&1 | grep -E "RACECHECK SUMMARY|ERROR SUMMARY" | head -1; echo " (exit ${PIPESTATUS[0]})"; done
echo "== decode after 512, v53 against v57, alternated"
for r in 1 2 3; do for a in gq8 gq4 lq8 lq4; do bench $P $a 512 $r; bench $V $a 512 $r; done; bench $O g16 512 $r; done
python3 - <<'PY'
import json
for a in ['gq8','gq4','lq8','lq4']:
    x=json.load(open(f'/tmp/res/v53-{a}-p512-1.json'))['bench']['ids']; y=json.load(open(f'/tmp/res/v57-{a}-p512-1.json'))['bench']['ids']
    print(a, 'v57 ids equal v53:', x == y, sum(i == j for i, j in zip(x, y)), len(x))
PY
tar czf $OUT/results.tar.gz -C $J .
echo done
