#!/usr/bin/env bash
# Second call: where a 512-token prefill's time goes (base and new), by kernel:
# sparsec-run --profile (each launch synchronized) and ncu's gpu__time_duration.
set -u
D=${D:-.device/v20}; J=/tmp/res2; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
N=$D/new; R=$N/sparsec-run
python3 $D/gpu_compare.py make /tmp/ck/gpt2 --family gpt2 > /dev/null || exit 1
python3 $D/gpu_compare.py make /tmp/ck/llama --family llama > /dev/null || exit 1
ck() { case $1 in g16) echo /tmp/ck/gpt2;; l16) echo /tmp/ck/llama;; esac; }
for a in g16 l16; do echo "== new $a --profile"; $R $N/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 512 --max-new-tokens 4 --positions 520 --session-seq 512 --profile > $J/prof-$a.txt 2>&1; sed -n '1,16p' $J/prof-$a.txt
  awk '/^prefill of/{p=1;next} /^decode/{p=0} p{n+=$4} END{print n}' $J/prof-$a.txt > $J/launches-$a; echo "prefill launches: $(cat $J/launches-$a)"; done
for v in base new; do for a in g16 l16; do
  timeout 200 ncu --csv --metrics gpu__time_duration.sum --launch-count $(cat $J/launches-$a) $D/$v/sparsec-run $D/$v/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 512 --max-new-tokens 1 --positions 520 --session-seq 512 > $J/ncu-$v-$a.csv 2>/dev/null
  python3 - $J/ncu-$v-$a.csv $v $a <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]; ki = h.index('Kernel Name'); vi = h.index('Metric Value'); ui = h.index('Metric Unit'); gi = h.index('Grid Size') if 'Grid Size' in h else None
t = collections.defaultdict(lambda: [0.0, 0, ''])
for r in rows[1:]:
    v = float(r[vi].replace(',', '')); u = r[ui]
    us = v / 1e3 if u == 'nsecond' else (v if u == 'usecond' else v * 1e3)
    e = t[r[ki].split('(')[0]]; e[0] += us; e[1] += 1; e[2] = r[gi] if gi is not None else ''
tot = sum(e[0] for e in t.values())
print(f'== ncu {sys.argv[2]} {sys.argv[3]}: {sum(e[1] for e in t.values())} launches, {tot/1e3:.2f} ms of kernel time')
for k, (us, n, g) in sorted(t.items(), key=lambda x: -x[1][0]):
    print(f'  {k:<24} {n:4d} launches {us/1e3:8.3f} ms {us/n:9.1f} us each  grid {g}')
PY
done; done
tar czf $OUT/results2.tar.gz -C $J .
echo done
