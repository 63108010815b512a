#!/usr/bin/env bash
# Second call: new2 = split k with 64-row tiles for outputs narrower than 1024
# (k of at least 18 k-tiles split 2 or 4 ways; wide outputs unsplit), against
# base = e3f8733. Checks, sanitizers, base and new2 alternated in two rounds,
# ncu of new2.
set -u
V=.device/v27; J=/tmp/res2; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
R=$V/new2/sparsec-run; RB=$V/base/sparsec-run
for s in 2 37 130 300 513; do echo -n "splitk seq $s (1e-4): "; $R $V/new2/splitk.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo; done
for t in memcheck racecheck synccheck; do echo -n "splitk seq 300 $t: "; timeout 120 compute-sanitizer --tool $t $R $V/new2/splitk.sparsec --device cuda --seq 300 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | head -1; echo; done
python3 benches/gpu_compare.py make /tmp/ck/gpt2 --family gpt2 > /dev/null || exit 1
python3 benches/gpu_compare.py make /tmp/ck/llama --family llama > /dev/null || exit 1
ck() { case $1 in g16*) echo /tmp/ck/gpt2;; l16*) echo /tmp/ck/llama;; esac; }
for a in g16 l16 g16h; do echo -n "new2 $a 300 in calls of 100 +8 vs CPU: "; $R $V/new2/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1; done
for a in g16 l16; do echo -n "new2 $a 130 in calls of 45 +3 vs interpreter: "; timeout 200 $R $V/new2/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 130 --max-new-tokens 3 --prefill-rows 45 --positions 256 --session-seq 256 --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1; done
bench() { # runner dir model prompt new positions tag round
  $1 $2/$3.sparsec --weights $(ck $3) --device cuda --bench-decode --prompt-len $4 --max-new-tokens $5 --positions $6 --session-seq 1024 --repeat 5 --json > $J/$7-$3-p$4-$8.json 2>$J/$7-$3-p$4-$8.err
  python3 -c "import json;b=json.load(open('$J/$7-$3-p$4-$8.json'))['bench'];print('$7 $3 prompt $4 r$8:', round(b['decode_tokens_per_s'],1), 'tok/s; prefill', round(1e3*b['timing']['prefill_s'],3), 'ms')" || tail -2 $J/$7-$3-p$4-$8.err
}
for r in 1 2; do for v in base new2; do RR=$R; [ $v = base ] && RR=$RB; for a in g16 l16 g16h l16h; do
  bench $RR $V/$v $a 128 32 200 $v $r; bench $RR $V/$v $a 512 32 600 $v $r; bench $RR $V/$v $a 960 16 1000 $v $r
done; done; done
python3 - <<'PY'
import json
for a in ['g16','l16','g16h','l16h']:
    for p in [128, 512, 960]:
        m=json.load(open(f'/tmp/res2/base-{a}-p{p}-1.json'))['bench']['ids']
        n=json.load(open(f'/tmp/res2/new2-{a}-p{p}-1.json'))['bench']['ids']
        print(a, p, 'new2 ids equal base ids for the first', next((i for i,(x,y) in enumerate(zip(m,n)) if x!=y), len(m)), 'of', len(m))
PY
for a in g16 l16; do
  timeout 200 ncu --csv --metrics gpu__time_duration.sum --launch-count $(case $a in g16*) echo 126;; l16*) echo 423;; esac) $R $V/new2/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 512 --max-new-tokens 1 --positions 520 --session-seq 512 > $J/ncu-new2-$a.csv 2>/dev/null
  python3 benches/gpu_compare.py ncu-summary $J/ncu-new2-$a.csv new2-$a
done
tar czf $OUT/results2.tar.gz -C $J .
echo done
