#!/usr/bin/env bash
# Device run 3 (issue 16, twenty-eighth session): f32 weights on the tensor-
# core tiles (the weights split into hi and lo f16 parts as the activations
# are, three MMAs a k-step) against the warp GEMV they replace (`-old`,
# compiled with the f32 tiles off); checks, sanitizers on 2-layer models,
# prefill and decode alternated, PyTorch f32 on the same weights.
set -u
O=.device/v52; V=.device/v54; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
R=$O/sparsec-run
for f in gpt2 llama; do python3 $O/gpu_compare.py make /tmp/ck/$f --family $f > /dev/null || exit 1; done
python3 $O/gpu_compare.py make /tmp/ck/gpt2l2 --family gpt2 --layers 2 --vocab 4096 > /dev/null || exit 1
python3 $O/gpu_compare.py make /tmp/ck/llamal2 --family llama --layers 2 --vocab 4096 > /dev/null || exit 1
ck() { case $1 in *g2*) echo /tmp/ck/gpt2l2;; *l2*) echo /tmp/ck/llamal2;; *g*) echo /tmp/ck/gpt2;; *l*) echo /tmp/ck/llama;; esac; }
bench() { # artifact prompt round
  $R $V/$1.sparsec --weights $(ck $1) --trust --device cuda --bench-decode --prompt-len $2 --max-new-tokens 128 --positions 1024 --session-seq 1024 --repeat 5 --json > $J/$1-p$2-$3.json 2>$J/$1-p$2-$3.err
  python3 -c "import json;b=json.load(open('$J/$1-p$2-$3.json'))['bench'];t=b['timing'];print('$1 p$2 r$3: prefill', round(1e3*t['prefill_s'],3), 'ms; decode', round(t['new_tokens']/t['decode_s'],1), 'tok/s')" || tail -2 $J/$1-p$2-$3.err
}
echo "== checks"
for s in 2 37 130 300; do echo -n "filetest seq $s: "; $R $V/ft.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo; done
for a in g32 l32; do
  echo -n "$a vs CPU, 300 in calls of 100 + 8: "
  $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 1e-4 --rtol 1e-4 2>&1 | tail -1
  echo -n "$a vs CPU, 513 in one call + 2: "
  $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 513 --max-new-tokens 2 --positions 1024 --session-seq 1024 --compare-cpu --atol 1e-4 --rtol 1e-4 2>&1 | tail -1
done
echo "== prefill and decode, medians of 5, alternated"
for a in g32 g32-old l32 l32-old; do bench $a 128 1; done
for r in 1 2 3; do for a in g32 g32-old l32 l32-old; do bench $a 512 $r; done; done
python3 - <<'PY'
import json
for a in ['g32','l32']:
    x=json.load(open(f'/tmp/res/{a}-p512-1.json'))['bench']['ids']; y=json.load(open(f'/tmp/res/{a}-old-p512-1.json'))['bench']['ids']
    print(a, 'tiles ids equal the warp GEMV ids:', x == y, sum(i == j for i, j in zip(x, y)), len(x))
PY
echo "== PyTorch f32 prefill on the same weights"
timeout 200 python3 $O/gpu_compare.py torch-prefill /tmp/ck/gpt2 --dtype float32 --lengths 128,512 > $J/gpt2-torch-prefill.json 2>$J/gpt2-torch-prefill.err; echo "exit $?"; cat $J/gpt2-torch-prefill.json; echo
timeout 200 python3 $O/gpu_compare.py torch-prefill /tmp/ck/llama --dtype float32 --lengths 512 > $J/llama-torch-prefill.json 2>$J/llama-torch-prefill.err; echo "exit $?"; cat $J/llama-torch-prefill.json; echo
echo "== sanitizers (2-layer models, 300 in calls of 100, + 2)"
for a in g2f32 l2f32; do for t in racecheck memcheck; do echo -n "$a $t: "; timeout 150 compute-sanitizer --tool $t $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --prefill-rows 100 --max-new-tokens 2 --positions 512 --session-seq 512 2>&1 | grep -E "RACECHECK SUMMARY|ERROR SUMMARY" | head -1; echo " (exit ${PIPESTATUS[0]})"; done; done
tar czf $OUT/results.tar.gz -C $J .
echo done
