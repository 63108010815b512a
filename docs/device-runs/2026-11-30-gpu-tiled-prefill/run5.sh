#!/usr/bin/env bash
# Fifth call: new3 = new2 + 32-row matmul tiles for outputs narrower than 1024
# (twice the blocks) + the prefill attention launched as one-warp blocks
# (KernelStep::gpu_mma_block = 32: its warps spread over every SM).
set -u
D=${D:-.device/v20}; J=/tmp/res5; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
R=$D/new3/sparsec-run; N=$D/new3
echo "== kernels vs the interpreter and the CPU"
for a in tiled wide2 mma attn; do for s in 2 17 37 65 128 300; do
  echo -n "$a seq $s: "; $R $N/$a.sparsec --device cuda --seq $s --check --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo
done; done
for a in tiled wide2; do echo -n "$a seq 37 at 1e-4: "; $R $N/$a.sparsec --device cuda --seq 37 --check --compare-cpu 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo; done
python3 $D/gpu_compare.py make /tmp/ck/gpt2 --family gpt2 > /dev/null || exit 1
python3 $D/gpu_compare.py make /tmp/ck/llama --family llama > /dev/null || exit 1
ck() { case $1 in g16) echo /tmp/ck/gpt2;; l16) echo /tmp/ck/llama;; esac; }
echo "== new3: 124M models vs the CPU session and the interpreter"
for a in g16 l16; do echo -n "$a 300 in calls of 100 +8: "; $R $N/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1; done
for a in g16 l16; do echo -n "$a 130 in calls of 45 +3 --check: "; timeout 200 $R $N/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 130 --max-new-tokens 3 --prefill-rows 45 --positions 256 --session-seq 256 --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1; done
echo "== sanitizers"
for a in tiled attn; do for t in memcheck racecheck; do echo -n "$a seq 37 $t: "; timeout 60 compute-sanitizer --tool $t $R $N/$a.sparsec --device cuda --seq 37 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | head -1; echo; done; done
echo -n "l16 memcheck 100 + 2: "; timeout 150 compute-sanitizer --tool memcheck $R $N/l16.sparsec --weights /tmp/ck/llama --device cuda --bench-decode --prompt-len 100 --max-new-tokens 2 --positions 128 --session-seq 64 2>&1 | grep -E "ERROR SUMMARY" | head -1; echo
echo "== prefill and decode, new2 and new3 alternated"
bench() { # version model prompt new positions tag
  $D/$1/sparsec-run $D/$1/$2.sparsec --weights $(ck $2) --device cuda --bench-decode --prompt-len $3 --max-new-tokens $4 --positions $5 --session-seq 1024 --repeat 5 --json > $J/$1-$2-$6.json 2>$J/$1-$2-$6.err
  python3 -c "import json;b=json.load(open('$J/$1-$2-$6.json'))['bench'];print('$1 $2 prompt $3:', round(b['decode_tokens_per_s'],1), 'tok/s; prefill', round(1e3*b['timing']['prefill_s'],2), 'ms')" || tail -2 $J/$1-$2-$6.err
}
for r in 1 2; do for v in new2 new3; do for a in g16 l16; do
  bench $v $a 128 64 200 p128-$r; bench $v $a 512 64 600 p512-$r; bench $v $a 960 32 1000 p960-$r
done; done; done
python3 - <<'PY'
import json
for a in ['g16','l16']:
    for p in [128, 512, 960]:
        m=json.load(open(f'/tmp/res5/new2-{a}-p{p}-1.json'))['bench']['ids']; n=json.load(open(f'/tmp/res5/new3-{a}-p{p}-1.json'))['bench']['ids']
        print(a, p, 'new3 ids equal new2 ids for the first', next((i for i,(x,y) in enumerate(zip(m,n)) if x!=y), len(m)), 'of', len(m))
PY
for a in g16 l16; do
  timeout 200 ncu --csv --metrics gpu__time_duration.sum --launch-count $(case $a in g16) echo 126;; l16) echo 423;; esac) $R $N/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 512 --max-new-tokens 1 --positions 520 --session-seq 512 > $J/ncu-new3-$a.csv 2>/dev/null
  python3 - $J/ncu-new3-$a.csv $a <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]; ki = h.index('Kernel Name'); vi = h.index('Metric Value'); gi = h.index('Grid Size')
t = collections.defaultdict(lambda: [0.0, 0, ''])
for r in rows[1:]:
    e = t[r[ki].split('(')[0]]; e[0] += float(r[vi].replace(',', '')) / 1e3; e[1] += 1; e[2] = r[gi]
print(f'== ncu new3 {sys.argv[2]}: {sum(e[1] for e in t.values())} launches, {sum(e[0] for e in t.values())/1e3:.3f} ms of kernel time')
for k, (us, n, g) in sorted(t.items(), key=lambda x: -x[1][0]):
    print(f'  {k:<24} {n:4d} launches {us/1e3:8.3f} ms {us/n:9.1f} us each  grid {g}')
PY
done
tar czf $OUT/results5.tar.gz -C $J .
echo done
