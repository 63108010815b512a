#!/usr/bin/env bash
# Sixth call: the matmul tiles. new3 = 32-row tiles (3 stages) below 1024 wide;
# new4 = the same with as many cp.async stages as fit 48 KB (5 at 32 rows);
# new5 = 64-row tiles (3 stages) everywhere. Attention as in new3 in all three.
# One runtime (new3's).
set -u
D=${D:-.device/v20}; J=/tmp/res6; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
R=$D/new3/sparsec-run
echo "== new4 kernels vs the interpreter and the CPU"
for a in tiled wide2; do for s in 2 37 65 300; do
  echo -n "new4 $a seq $s: "; $R $D/new4/$a.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo
done; done
echo -n "new4 tiled seq 37 racecheck: "; timeout 60 compute-sanitizer --tool racecheck $R $D/new4/tiled.sparsec --device cuda --seq 37 2>&1 | grep -E "RACECHECK SUMMARY" | head -1; echo
python3 $D/gpu_compare.py make /tmp/ck/gpt2 --family gpt2 > /dev/null || exit 1
python3 $D/gpu_compare.py make /tmp/ck/llama --family llama > /dev/null || exit 1
ck() { case $1 in g16) echo /tmp/ck/gpt2;; l16) echo /tmp/ck/llama;; esac; }
for a in g16 l16; do echo -n "new4 $a 300 in calls of 100 +8: "; $R $D/new4/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1; done
bench() { # version model prompt new positions tag
  $R $D/$1/$2.sparsec --weights $(ck $2) --device cuda --bench-decode --prompt-len $3 --max-new-tokens $4 --positions $5 --session-seq 1024 --repeat 5 --json > $J/$1-$2-$6.json 2>$J/$1-$2-$6.err
  python3 -c "import json;b=json.load(open('$J/$1-$2-$6.json'))['bench'];print('$1 $2 prompt $3:', round(b['decode_tokens_per_s'],1), 'tok/s; prefill', round(1e3*b['timing']['prefill_s'],2), 'ms')" || tail -2 $J/$1-$2-$6.err
}
for r in 1 2; do for v in new3 new4 new5; do for a in g16 l16; do
  bench $v $a 128 16 200 p128-$r; bench $v $a 512 16 600 p512-$r; bench $v $a 960 16 1000 p960-$r
done; done; done
for v in new4 new5; do for a in g16 l16; do
  timeout 200 ncu --csv --metrics gpu__time_duration.sum --launch-count $(case $a in g16) echo 126;; l16) echo 423;; esac) $R $D/$v/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 512 --max-new-tokens 1 --positions 520 --session-seq 512 > $J/ncu-$v-$a.csv 2>/dev/null
  python3 - $J/ncu-$v-$a.csv $v $a <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]; ki = h.index('Kernel Name'); vi = h.index('Metric Value'); gi = h.index('Grid Size')
t = collections.defaultdict(lambda: [0.0, 0, ''])
for r in rows[1:]:
    e = t[r[ki].split('(')[0]]; e[0] += float(r[vi].replace(',', '')) / 1e3; e[1] += 1; e[2] = r[gi]
print(f'== ncu {sys.argv[2]} {sys.argv[3]}: {sum(e[0] for e in t.values())/1e3:.3f} ms of kernel time')
for k, (us, n, g) in sorted(t.items(), key=lambda x: -x[1][0])[:7]:
    print(f'  {k:<24} {n:4d} launches {us/n:9.1f} us each  grid {g}')
PY
done; done
tar czf $OUT/results6.tar.gz -C $J .
echo done
