#!/usr/bin/env bash
# Second call: prefill attention with its keys split over a block of 4 warps
# (split4: TF32 MMAs as before; f16: the same with f16 m16n8k16 MMAs), against
# base = v22/new (8807fa9: f16/bf16 MMAs in the tiled matmul). Checks,
# sanitizers, alternated benches, PyTorch's prefill, ncu of f16.
set -u
D=.device/v22; E=.device/v23; J=/tmp/res2; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
R=$D/sparsec-run
echo "== attention kernels vs the interpreter and the CPU (2e-3)"
for v in split4 f16; do for a in attn; do for s in 2 17 37 65 128 300; do
  echo -n "$v $a seq $s: "; $R $E/$v/$a.sparsec --device cuda --seq $s --check --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo
done; done; done
for s in 2 37 300; do echo -n "f16 attn128 seq $s: "; $R $E/f16/attn128.sparsec --device cuda --seq $s --check --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo; done
for s in 37 300; do echo -n "f16 tiled seq $s (1e-4): "; $R $E/f16/tiled.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo; done
for t in memcheck racecheck synccheck; do for s in 37 300; do echo -n "f16 attn seq $s $t: "; timeout 90 compute-sanitizer --tool $t $R $E/f16/attn.sparsec --device cuda --seq $s 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | head -1; echo; done; done
python3 $D/gpu_compare.py make /tmp/ck/gpt2 --family gpt2 > /dev/null || exit 1
python3 $D/gpu_compare.py make /tmp/ck/llama --family llama > /dev/null || exit 1
ck() { case $1 in g16) echo /tmp/ck/gpt2;; l16) echo /tmp/ck/llama;; esac; }
for a in g16 l16; do echo -n "f16 $a 300 in calls of 100 +8 vs CPU: "; $R $E/f16/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1; done
for a in g16 l16; do echo -n "f16 $a 130 in calls of 45 +3 vs interpreter: "; timeout 200 $R $E/f16/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 130 --max-new-tokens 3 --prefill-rows 45 --positions 256 --session-seq 256 --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1; done
bench() { # dir version model prompt new positions tag
  $R $1/$2.sparsec --weights $(ck $2) --device cuda --bench-decode --prompt-len $3 --max-new-tokens $4 --positions $5 --session-seq 1024 --repeat 5 --json > $J/$6-$2-p$3-$7.json 2>$J/$6-$2-p$3-$7.err
  python3 -c "import json;b=json.load(open('$J/$6-$2-p$3-$7.json'))['bench'];print('$6 $2 prompt $3:', round(b['decode_tokens_per_s'],1), 'tok/s; prefill', round(1e3*b['timing']['prefill_s'],2), 'ms')" || tail -2 $J/$6-$2-p$3-$7.err
}
for r in 1 2; do for v in base split4 f16; do dir=$E/$v; [ $v = base ] && dir=$D/new; for a in g16 l16; do
  bench $dir $a 128 64 200 $v $r; bench $dir $a 512 64 600 $v $r; bench $dir $a 960 32 1000 $v $r
done; done; done
python3 - <<'PY'
import json
for a in ['g16','l16']:
    for p in [128, 512, 960]:
        m=json.load(open(f'/tmp/res2/base-{a}-p{p}-1.json'))['bench']['ids']
        for v in ['split4','f16']:
            n=json.load(open(f'/tmp/res2/{v}-{a}-p{p}-1.json'))['bench']['ids']
            print(a, p, v, 'ids equal base ids for the first', next((i for i,(x,y) in enumerate(zip(m,n)) if x!=y), len(m)), 'of', len(m))
PY
python3 $D/prefill_torch.py /tmp/ck/gpt2 float16 > $J/gpt2-torch.json 2>$J/gpt2-torch.err; echo "torch gpt2: $(cat $J/gpt2-torch.json)"
python3 $D/prefill_torch.py /tmp/ck/llama bfloat16 > $J/llama-torch.json 2>$J/llama-torch.err; echo "torch llama: $(cat $J/llama-torch.json)"
for a in g16 l16; do
  timeout 200 ncu --csv --metrics gpu__time_duration.sum --launch-count $(case $a in g16) echo 126;; l16) echo 423;; esac) $R $E/f16/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 512 --max-new-tokens 1 --positions 520 --session-seq 512 > $J/ncu-f16-$a.csv 2>/dev/null
  python3 $D/ncu_sum.py $J/ncu-f16-$a.csv f16-$a
done
tar czf $OUT/results2.tar.gz -C $J .
echo done
