#!/usr/bin/env bash
# Device run (issue 16, twenty-seventh session): the tensor-core prefill
# attention with 8 warps per (16 rows, head) instead of 4 (`s8`), with the
# values' loads issued before the scores and the next tile's keys loaded
# one tile ahead (`pipe`), and both (`s8p`), against `base`: checks against
# the CPU session, racecheck on 2-layer GPT-2, prefill of 512 alternated,
# and PyTorch's prefill on the same weights.
set -u
V=.device/v50; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
R=$V/sparsec-run
for f in gpt2 llama; do python3 $V/gpu_compare.py make /tmp/ck/$f --family $f > /dev/null || exit 1; done
python3 $V/gpu_compare.py make /tmp/ck/gpt2l2 --family gpt2 --layers 2 --vocab 4096 > /dev/null || exit 1
ck() { case $1 in g2*) echo /tmp/ck/gpt2l2;; g*) echo /tmp/ck/gpt2;; l*) echo /tmp/ck/llama;; esac; }
echo "== checks"
for a in g16-s8 g16-pipe g16-s8p l16-s8p; do
  echo -n "$a vs CPU, 300-token prompt in calls of 100 + 8: "
  $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
done
echo -n "g2-s8p racecheck (300 in calls of 100, + 2): "; timeout 120 compute-sanitizer --tool racecheck $R $V/g2-s8p.sparsec --weights /tmp/ck/gpt2l2 --device cuda --bench-decode --prompt-len 300 --prefill-rows 100 --max-new-tokens 2 --positions 512 --session-seq 512 2>&1 | grep -E "RACECHECK SUMMARY|rror" | head -2; echo " (exit ${PIPESTATUS[0]})"
echo -n "g2-s8p memcheck: "; timeout 120 compute-sanitizer --tool memcheck $R $V/g2-s8p.sparsec --weights /tmp/ck/gpt2l2 --device cuda --bench-decode --prompt-len 300 --prefill-rows 100 --max-new-tokens 2 --positions 512 --session-seq 512 2>&1 | grep -E "ERROR SUMMARY" | head -1; echo " (exit ${PIPESTATUS[0]})"
bench() { # artifact prompt round
  $R $V/$1.sparsec --weights $(ck $1) --trust --device cuda --bench-decode --prompt-len $2 --max-new-tokens 8 --positions 1024 --session-seq 1024 --repeat 5 --json > $J/$1-p$2-$3.json 2>$J/$1-p$2-$3.err
  python3 -c "import json;b=json.load(open('$J/$1-p$2-$3.json'))['bench'];print('$1 p$2 r$3: prefill', round(1e3*b['timing']['prefill_s'],3), 'ms')" || tail -2 $J/$1-p$2-$3.err
}
echo "== prefill, medians of 5, alternated"
for r in 1 2 3; do for p in 512 960; do for m in base s8 pipe s8p; do bench g16-$m $p $r; bench l16-$m $p $r; done; done; done
echo "== ncu attention kernel time, base vs s8p, 512"
for m in base s8p; do timeout 120 ncu --metrics gpu__time_duration.sum -k regex:attention --csv $R $V/g16-$m.sparsec --weights /tmp/ck/gpt2 --trust --device cuda --bench-decode --prompt-len 512 --max-new-tokens 1 --positions 1024 --session-seq 1024 > $J/ncu-$m.csv 2>/dev/null
  python3 -c "
import csv
rows=[r for r in csv.reader(open('$J/ncu-$m.csv')) if len(r)>10]
h=rows[0]; i=h.index('Metric Value'); k=h.index('Kernel Name')
v=[float(r[i].replace(',','')) for r in rows[1:] if 'attention' in r[k]]
print('$m attention launches', len(v), 'sum us', round(sum(v)/1e3,1) if v and max(v)>1000 else round(sum(v),1), 'max', max(v) if v else None)" || echo ncu failed; done
echo "== PyTorch prefill on the same weights"
timeout 200 python3 $V/gpu_compare.py torch-prefill /tmp/ck/gpt2 --dtype float16 --lengths 512,960 > $J/gpt2-torch-prefill.json 2>$J/gpt2-torch-prefill.err; echo "exit $?"; cat $J/gpt2-torch-prefill.json | head -c 600; echo
tar czf $OUT/results.tar.gz -C $J .
echo done
