#!/usr/bin/env bash
# Third call: conv = the tiled matmul splitting each activation chunk into f16
# (bf16) hi and lo once per block (by the thread that copied it) into a
# double-buffered shared tile, instead of every warp splitting its fragments
# (4x redundant at 32-row tiles); 2 copy stages at 64-row tiles (static
# shared memory), 3 at 32. Against f16 = v23/f16 (7f307ee).
set -u
D=.device/v22; E=.device/v23; F=.device/v24; J=/tmp/res3; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
R=$D/sparsec-run; N=$F/conv
for a in tiled wide2; do for s in 2 17 37 65 128 300; do
  echo -n "conv $a seq $s: "; $R $N/$a.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo
done; done
for a in tiled wide2; do for t in memcheck racecheck synccheck; do echo -n "conv $a seq 70 $t: "; timeout 90 compute-sanitizer --tool $t $R $N/$a.sparsec --device cuda --seq 70 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | head -1; echo; done; done
B="--device cuda --bench-decode --prompt-len 20 --max-new-tokens 12 --prefill-rows 7 --session-seq 32 --positions 32"
for m in gpt2_tiny-f16 llama_tiny-bf16; do echo "== $m"; $R $N/$m.sparsec $B --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1; $R $N/$m.sparsec $B --compare-cpu 2>&1 | tail -1; done
python3 $D/gpu_compare.py make /tmp/ck/gpt2 --family gpt2 > /dev/null || exit 1
python3 $D/gpu_compare.py make /tmp/ck/llama --family llama > /dev/null || exit 1
ck() { case $1 in g16) echo /tmp/ck/gpt2;; l16) echo /tmp/ck/llama;; esac; }
for a in g16 l16; do echo -n "conv $a 300 in calls of 100 +8 vs CPU: "; $R $N/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1; done
for a in g16 l16; do echo -n "conv $a 130 in calls of 45 +3 vs interpreter: "; timeout 200 $R $N/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 130 --max-new-tokens 3 --prefill-rows 45 --positions 256 --session-seq 256 --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1; done
bench() { # dir model prompt new positions version round
  $R $1/$2.sparsec --weights $(ck $2) --device cuda --bench-decode --prompt-len $3 --max-new-tokens $4 --positions $5 --session-seq 1024 --repeat 5 --json > $J/$6-$2-p$3-$7.json 2>$J/$6-$2-p$3-$7.err
  python3 -c "import json;b=json.load(open('$J/$6-$2-p$3-$7.json'))['bench'];print('$6 $2 prompt $3:', round(b['decode_tokens_per_s'],1), 'tok/s; prefill', round(1e3*b['timing']['prefill_s'],2), 'ms')" || tail -2 $J/$6-$2-p$3-$7.err
}
for r in 1 2; do for v in f16 conv; do dir=$E/$v; [ $v = conv ] && dir=$N; for a in g16 l16; do
  bench $dir $a 128 64 200 $v $r; bench $dir $a 512 64 600 $v $r; bench $dir $a 960 32 1000 $v $r
done; done; done
python3 - <<'PY'
import json
for a in ['g16','l16']:
    for p in [128, 512, 960]:
        m=json.load(open(f'/tmp/res3/f16-{a}-p{p}-1.json'))['bench']['ids']; n=json.load(open(f'/tmp/res3/conv-{a}-p{p}-1.json'))['bench']['ids']
        print(a, p, 'conv ids equal f16 ids for the first', next((i for i,(x,y) in enumerate(zip(m,n)) if x!=y), len(m)), 'of', len(m))
PY
python3 $D/gpu_compare.py torch-prefill /tmp/ck/gpt2 --dtype float16 > $J/gpt2-torch.json 2>$J/gpt2-torch.err; echo "torch gpt2: $(cat $J/gpt2-torch.json)"
python3 $D/gpu_compare.py torch-prefill /tmp/ck/llama --dtype bfloat16 > $J/llama-torch.json 2>$J/llama-torch.err; echo "torch llama: $(cat $J/llama-torch.json)"
for a in g16 l16; do
  timeout 200 ncu --csv --metrics gpu__time_duration.sum --launch-count $(case $a in g16) echo 126;; l16) echo 423;; esac) $R $N/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 512 --max-new-tokens 1 --positions 520 --session-seq 512 > $J/ncu-conv-$a.csv 2>/dev/null
  python3 $D/gpu_compare.py ncu-summary $J/ncu-conv-$a.csv conv-$a
done
tar czf $OUT/results3.tar.gz -C $J .
echo done
