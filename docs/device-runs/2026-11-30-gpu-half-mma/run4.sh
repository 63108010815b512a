#!/usr/bin/env bash
# Fourth call: half = --gpu-mma-activations half (the tiled matmul's
# activations rounded to the weights' type, one MMA per k-step, as PyTorch's
# f16/bf16 GEMMs) against f16 = v23/f16 (the default, split). Errors against
# the interpreter and CPU, greedy ids, alternated benches, PyTorch, ncu.
set -u
D=.device/v22; E=.device/v23; F=.device/v25; J=/tmp/res4; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
R=$D/sparsec-run; N=$F/half
for a in tiled wide2; do for s in 2 37 300; do
  echo -n "half $a seq $s (5e-2): "; $R $N/$a.sparsec --device cuda --seq $s --check --compare-cpu --atol 5e-2 --rtol 5e-2 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo
done; done
for t in memcheck racecheck; do echo -n "half tiled seq 70 $t: "; timeout 90 compute-sanitizer --tool $t $R $N/tiled.sparsec --device cuda --seq 70 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | head -1; echo; done
B="--device cuda --bench-decode --prompt-len 20 --max-new-tokens 12 --prefill-rows 7 --session-seq 32 --positions 32"
for m in gpt2_tiny-f16 llama_tiny-bf16; do echo "== $m"; $R $N/$m.sparsec $B --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1; $R $N/$m.sparsec $B --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1; done
python3 $D/gpu_compare.py make /tmp/ck/gpt2 --family gpt2 > /dev/null || exit 1
python3 $D/gpu_compare.py make /tmp/ck/llama --family llama > /dev/null || exit 1
ck() { case $1 in g16) echo /tmp/ck/gpt2;; l16) echo /tmp/ck/llama;; esac; }
for tol in 2e-3 2e-2; do for a in g16 l16; do echo -n "half $a 300 in calls of 100 +8 vs CPU ($tol): "; $R $N/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol $tol --rtol $tol 2>&1 | tail -1; done; done
for a in g16 l16; do echo -n "half $a 130 in calls of 45 +3 vs interpreter (2e-2): "; timeout 200 $R $N/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 130 --max-new-tokens 3 --prefill-rows 45 --positions 256 --session-seq 256 --check --atol 2e-2 --rtol 2e-2 2>&1 | tail -1; done
bench() { # dir model prompt new positions version round
  $R $1/$2.sparsec --weights $(ck $2) --device cuda --bench-decode --prompt-len $3 --max-new-tokens $4 --positions $5 --session-seq 1024 --repeat 5 --json > $J/$6-$2-p$3-$7.json 2>$J/$6-$2-p$3-$7.err
  python3 -c "import json;b=json.load(open('$J/$6-$2-p$3-$7.json'))['bench'];print('$6 $2 prompt $3:', round(b['decode_tokens_per_s'],1), 'tok/s; prefill', round(1e3*b['timing']['prefill_s'],2), 'ms')" || tail -2 $J/$6-$2-p$3-$7.err
}
for r in 1 2; do for v in f16 half; do dir=$E/$v; [ $v = half ] && dir=$N; for a in g16 l16; do
  bench $dir $a 128 64 200 $v $r; bench $dir $a 512 64 600 $v $r; bench $dir $a 960 32 1000 $v $r
done; done; done
python3 - <<'PY'
import json
for a in ['g16','l16']:
    for p in [128, 512, 960]:
        m=json.load(open(f'/tmp/res4/f16-{a}-p{p}-1.json'))['bench']['ids']; n=json.load(open(f'/tmp/res4/half-{a}-p{p}-1.json'))['bench']['ids']
        print(a, p, 'half ids equal f16 ids for the first', next((i for i,(x,y) in enumerate(zip(m,n)) if x!=y), len(m)), 'of', len(m))
PY
python3 $D/gpu_compare.py torch-prefill /tmp/ck/gpt2 --dtype float16 > $J/gpt2-torch.json 2>$J/gpt2-torch.err; echo "torch gpt2: $(cat $J/gpt2-torch.json)"
python3 $D/gpu_compare.py torch-prefill /tmp/ck/llama --dtype bfloat16 > $J/llama-torch.json 2>$J/llama-torch.err; echo "torch llama: $(cat $J/llama-torch.json)"
timeout 200 ncu --csv --metrics gpu__time_duration.sum --launch-count 126 $R $N/g16.sparsec --weights /tmp/ck/gpt2 --device cuda --bench-decode --prompt-len 512 --max-new-tokens 1 --positions 520 --session-seq 512 > $J/ncu-half-g16.csv 2>/dev/null
python3 $D/gpu_compare.py ncu-summary $J/ncu-half-g16.csv half-g16
tar czf $OUT/results4.tar.gz -C $J .
echo done
