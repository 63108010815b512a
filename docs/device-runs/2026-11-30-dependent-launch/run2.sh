#!/usr/bin/env bash
# Third call: the one-row matmul kernels (warp per output: dense f16/bf16/f32
# and quantized rows, CSR values and columns) prefetch their block's weight
# bytes into L2 before griddepcontrol.wait, while the kernel before still
# runs (v31), against the same kernels without it (v30); one sparsec-run (the
# runtime did not change), dependent launch on for both.
set -u
A=.device/v30; B=.device/v31; J=/tmp/res2; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
R=$B/sparsec-run
for f in gpt2 llama; do python3 $B/gpu_compare.py make /tmp/ck/$f --family $f > /dev/null || exit 1; done
ck() { case $1 in g*) echo /tmp/ck/gpt2;; l*) echo /tmp/ck/llama;; esac; }
for a in g16 l16 g90; do
  echo -n "v31 $a vs CPU, 300-token prompt in calls of 100 + 8: "
  $R $B/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
done
for a in g16 g90; do echo -n "v31 $a memcheck: "; timeout 100 compute-sanitizer --tool memcheck $R $B/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 12 --max-new-tokens 3 --positions 32 2>&1 | grep -E "ERROR SUMMARY" | head -1; echo; done
echo -n "v31 g16 racecheck (timeout 240): "; timeout 240 compute-sanitizer --tool racecheck $R $B/g16.sparsec --weights /tmp/ck/gpt2 --device cuda --bench-decode --prompt-len 4 --max-new-tokens 2 --positions 16 2>&1 | grep -E "RACECHECK SUMMARY|ERROR SUMMARY" | head -1; echo " (exit ${PIPESTATUS[0]})"
bench() { # dir artifact tag round
  $R $1/$2.sparsec --weights $(ck $2) --device cuda --bench-decode --prompt-len 128 --max-new-tokens 128 --positions 300 --session-seq 1024 --repeat 5 --json > $J/$2-$3-$4.json 2>$J/$2-$3-$4.err
  python3 -c "import json;b=json.load(open('$J/$2-$3-$4.json'))['bench'];print('$2 $3 r$4:', round(b['decode_tokens_per_s'],1), 'tok/s; prefill 128', round(1e3*b['timing']['prefill_s'],3), 'ms')" || tail -2 $J/$2-$3-$4.err
}
echo "== decode after 128 tokens, 128 new, medians of 5; v30 / v31 alternated, three rounds"
for r in 1 2 3; do for a in g16 l16 g90; do bench $A $a v30 $r; bench $B $a v31 $r; done; done
python3 - <<'PY'
import json
for a in ['g16','l16','g90']:
    x=json.load(open(f'/tmp/res2/{a}-v30-1.json'))['bench']['ids']; y=json.load(open(f'/tmp/res2/{a}-v31-1.json'))['bench']['ids']
    print(a, 'v31 ids equal v30 ids for the first', next((i for i,(u,v) in enumerate(zip(x,y)) if u!=v), len(x)), 'of', len(x))
PY
tar czf $OUT/results2.tar.gz -C $J .
echo done
