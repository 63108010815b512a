#!/usr/bin/env bash
# Device run (issue 16, twenty-seventh session): the tensor-core prefill
# attention's bands walked from the last (`rev`: the blocks with the most
# keys start first) against `base`: checks, racecheck, prefill alternated,
# the attention kernel under ncu, and PyTorch's prefill on the same weights.
set -u
V=.device/v50; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
R=$V/sparsec-run
for f in gpt2 llama; do python3 $V/gpu_compare.py make /tmp/ck/$f --family $f > /dev/null || exit 1; done
python3 $V/gpu_compare.py make /tmp/ck/gpt2l2 --family gpt2 --layers 2 --vocab 4096 > /dev/null || exit 1
ck() { case $1 in g2*) echo /tmp/ck/gpt2l2;; g*) echo /tmp/ck/gpt2;; l*) echo /tmp/ck/llama;; esac; }
echo "== checks"
for a in g16-rev g16h-rev l16-rev; do
  echo -n "$a vs CPU, 300-token prompt in calls of 100 + 8: "
  $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
done
echo -n "g2-rev vs CPU, 513-token prompt in one call + 2: "; $R $V/g2-rev.sparsec --weights /tmp/ck/gpt2l2 --device cuda --bench-decode --prompt-len 513 --max-new-tokens 2 --positions 1024 --session-seq 1024 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
for t in racecheck memcheck; do echo -n "g2-rev $t (300 in calls of 100, + 2): "; timeout 120 compute-sanitizer --tool $t $R $V/g2-rev.sparsec --weights /tmp/ck/gpt2l2 --device cuda --bench-decode --prompt-len 300 --prefill-rows 100 --max-new-tokens 2 --positions 512 --session-seq 512 2>&1 | grep -E "RACECHECK SUMMARY|ERROR SUMMARY" | head -1; echo " (exit ${PIPESTATUS[0]})"; done
bench() { # artifact prompt round
  $R $V/$1.sparsec --weights $(ck $1) --trust --device cuda --bench-decode --prompt-len $2 --max-new-tokens 8 --positions 1024 --session-seq 1024 --repeat 5 --json > $J/$1-p$2-$3.json 2>$J/$1-p$2-$3.err
  python3 -c "import json;b=json.load(open('$J/$1-p$2-$3.json'))['bench'];print('$1 p$2 r$3: prefill', round(1e3*b['timing']['prefill_s'],3), 'ms')" || tail -2 $J/$1-p$2-$3.err
}
echo "== prefill, medians of 5, alternated"
for r in 1 2 3; do for p in 128 512 960; do for a in g16 g16h l16; do for m in base rev; do bench $a-$m $p $r; done; done; done; done
python3 - <<'PY'
import json
for a in ['g16','g16h','l16']:
    for p in [128, 512, 960]:
        x=json.load(open(f'/tmp/res/{a}-base-p{p}-1.json'))['bench']['ids']; y=json.load(open(f'/tmp/res/{a}-rev-p{p}-1.json'))['bench']['ids']
        print(a, p, 'rev ids equal base ids:', x == y, len(x))
PY
echo "== ncu attention kernel, 512"
for m in base rev; do timeout 120 ncu --metrics gpu__time_duration.sum -k regex:attention --csv $R $V/g16-$m.sparsec --weights /tmp/ck/gpt2 --trust --device cuda --bench-decode --prompt-len 512 --max-new-tokens 1 --positions 1024 --session-seq 1024 > $J/ncu-$m.csv 2>/dev/null
  python3 -c "
import csv
rows=[r for r in csv.reader(open('$J/ncu-$m.csv')) if len(r)>10]
h=rows[0]; i=h.index('Metric Value'); g=h.index('Grid Size')
v=sorted(float(r[i].replace(',','')) for r in rows[1:] if r[g].startswith('(384'))
print('$m prefill attention launches', len(v), 'median ns', v[len(v)//2] if v else None)" || echo ncu failed; done
echo "== PyTorch prefill on the same weights"
timeout 200 python3 $V/gpu_compare.py torch-prefill /tmp/ck/gpt2 --dtype float16 --lengths 128,512,960 > $J/gpt2-torch-prefill.json 2>$J/gpt2-torch-prefill.err; echo "exit $?"; cat $J/gpt2-torch-prefill.json; echo
timeout 200 python3 $V/gpu_compare.py torch-prefill /tmp/ck/llama --dtype bfloat16 --lengths 512 > $J/llama-torch-prefill.json 2>$J/llama-torch-prefill.err; echo "exit $?"; cat $J/llama-torch-prefill.json; echo
tar czf $OUT/results.tar.gz -C $J .
echo done
