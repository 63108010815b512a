#!/usr/bin/env bash
# Device run (issue 16): prefill matmuls on shared-memory tiles (mma_tiled: a block
# of 8 warps per 64 rows x 64 features, k-tiles of 32 in shared memory, manifest 13).
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
for a in g16 l16; do SPARSEC_PROFILE=1 $R $N/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 512 --max-new-tokens 1 --positions 520 --session-seq 512 2>&1 | grep -v '^\s*$' | tail -25; done
echo "== prefill and decode, base and new alternated"
bench() { # version model prompt new positions tag
  $D/$1/sparsec-run $D/$1/$2.sparsec --weights $(ck $2) --device cuda --bench-decode --prompt-len $3 --max-new-tokens $4 --positions $5 --session-seq 1024 --repeat 5 --json > $J/$1-$2-$6.json 2>$J/$1-$2-$6.err
  python3 -c "import json;b=json.load(open('$J/$1-$2-$6.json'))['bench'];print('$1 $2 prompt $3:', round(b['decode_tokens_per_s'],1), 'tok/s; prefill', round(1e3*b['timing']['prefill_s'],2), 'ms')" || tail -2 $J/$1-$2-$6.err
}
for r in 1 2; do for v in base new; do for a in g16 l16; do
  bench $v $a 128 32 200 p128-$r; bench $v $a 512 32 600 p512-$r; bench $v $a 960 32 1000 p960-$r
done; done; done
python3 - <<'PY'
import json
for a in ['g16','l16']:
    for p in [128, 512, 960]:
        m=json.load(open(f'/tmp/res/base-{a}-p{p}-1.json'))['bench']['ids']; n=json.load(open(f'/tmp/res/new-{a}-p{p}-1.json'))['bench']['ids']
        print(a, p, 'new ids equal base ids for the first', next((i for i,(x,y) in enumerate(zip(m,n)) if x!=y), len(m)), 'of', len(m))
PY
tar czf $OUT/results.tar.gz -C $J .
echo done
