#!/usr/bin/env bash
# Device run (issue 16), third call: prefill matmuls on shared-memory tiles
# (mma_tiled: a block of 8 warps per 64 rows x 64 features, k-tiles of 32 copied
# with cp.async three stages deep, manifest 13), and the CUDA session's row-local
# tail found among joined appends (the LM head on the last row only).
# base = e8f8da0's artifacts and runtime (manifest 12), new = this change.
set -u
D=${D:-.device/v20}; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
R=$D/new/sparsec-run; N=$D/new
echo "== tensor-core kernels vs the interpreter and the CPU"
for a in tiled wide2 mma; do for s in 2 5 16 17 37 64 65 128 200; do
  echo -n "$a seq $s: "; $R $N/$a.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo
done; done
B="--device cuda --bench-decode --prompt-len 20 --max-new-tokens 12 --prefill-rows 7 --session-seq 32 --positions 32"
for m in gpt2_tiny-f16 llama_tiny-f16 llama_tiny-bf16; do
  A=$N/$m.sparsec; echo "== $m"
  $R $A $B --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
  $R $A $B --compare-cpu 2>&1 | tail -1
done
python3 $D/gpu_compare.py make /tmp/ck/gpt2 --family gpt2 > /dev/null || exit 1
python3 $D/gpu_compare.py make /tmp/ck/llama --family llama > /dev/null || exit 1
ck() { case $1 in g16) echo /tmp/ck/gpt2;; l16) echo /tmp/ck/llama;; esac; }
echo "== new: 124M models, CUDA session vs the CPU session"
for a in g16 l16; do echo -n "$a 300 in calls of 100 +8: "; $R $N/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1; done
echo "== sanitizers"
for t in memcheck racecheck; do echo -n "tiled seq 37 $t: "; timeout 60 compute-sanitizer --tool $t $R $N/tiled.sparsec --device cuda --seq 37 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | head -1; echo; done
echo -n "wide2 seq 70 memcheck: "; timeout 60 compute-sanitizer --tool memcheck $R $N/wide2.sparsec --device cuda --seq 70 2>&1 | grep -E "ERROR SUMMARY" | head -1; echo
echo -n "gpt2_tiny racecheck: "; timeout 90 compute-sanitizer --tool racecheck $R $N/gpt2_tiny-f16.sparsec --device cuda --bench-decode --prompt-len 20 --max-new-tokens 3 --session-seq 6 --positions 32 2>&1 | grep -E "RACECHECK SUMMARY|ERROR SUMMARY" | head -1; echo
echo "== per-kernel profile of a 512-token prefill (new)"
for a in g16 l16; do $R $N/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 512 --max-new-tokens 2 --positions 520 --session-seq 512 --profile 2>&1 | sed -n '1,14p'; done
echo "== prefill and decode, base and new alternated"
bench() { # version model prompt new positions tag
  $D/$1/sparsec-run $D/$1/$2.sparsec --weights $(ck $2) --device cuda --bench-decode --prompt-len $3 --max-new-tokens $4 --positions $5 --session-seq 1024 --repeat 5 --json > $J/$1-$2-$6.json 2>$J/$1-$2-$6.err
  python3 -c "import json;b=json.load(open('$J/$1-$2-$6.json'))['bench'];print('$1 $2 prompt $3:', round(b['decode_tokens_per_s'],1), 'tok/s; prefill', round(1e3*b['timing']['prefill_s'],2), 'ms')" || tail -2 $J/$1-$2-$6.err
}
for r in 1 2; do for v in base new; do for a in g16 l16; do
  bench $v $a 128 32 200 p128-$r; bench $v $a 512 32 600 p512-$r; bench $v $a 960 32 1000 p960-$r
done; done; done
for a in g16 l16; do
  timeout 200 ncu --csv --metrics gpu__time_duration.sum --launch-count $(case $a in g16) echo 126;; l16) echo 423;; esac) $R $N/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 512 --max-new-tokens 1 --positions 520 --session-seq 512 > $J/ncu-new-$a.csv 2>/dev/null
  python3 - $J/ncu-new-$a.csv $a <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]; ki = h.index('Kernel Name'); vi = h.index('Metric Value'); gi = h.index('Grid Size')
t = collections.defaultdict(lambda: [0.0, 0, ''])
for r in rows[1:]:
    e = t[r[ki].split('(')[0]]; e[0] += float(r[vi].replace(',', '')) / 1e3; e[1] += 1; e[2] = r[gi]
print(f'== ncu new {sys.argv[2]} (ns read as us/1e3): {sum(e[1] for e in t.values())} launches, {sum(e[0] for e in t.values())/1e3:.3f} ms of kernel time')
for k, (us, n, g) in sorted(t.items(), key=lambda x: -x[1][0]):
    print(f'  {k:<24} {n:4d} launches {us/1e3:8.3f} ms {us/n:9.1f} us each  grid {g}')
PY
done
python3 - <<'PY'
import json
for a in ['g16','l16']:
    for p in [128, 512, 960]:
        m=json.load(open(f'/tmp/res/base-{a}-p{p}-1.json'))['bench']['ids']; n=json.load(open(f'/tmp/res/new-{a}-p{p}-1.json'))['bench']['ids']
        print(a, p, 'new ids equal base ids for the first', next((i for i,(x,y) in enumerate(zip(m,n)) if x!=y), len(m)), 'of', len(m))
PY
tar czf $OUT/results.tar.gz -C $J .
echo done
