#!/usr/bin/env bash
# First call: `new` = the shared-memory tiled matmul on f16/bf16 MMAs
# (m16n8k16, the weights as stored, the activations split into hi and lo of
# the weights' type) instead of TF32 (m16n8k8, the activations split, the
# weights widened). `base` = v20/new7 (6ee3abe). Checks, base against new,
# PyTorch's prefill in the same call, ncu of a 512-token prefill.
set -u
D=${D:-.device/v22}; J=/tmp/res1; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
R=$D/sparsec-run; N=$D/new
echo "== new kernels vs the interpreter and the CPU (1e-4)"
for a in tiled wide2; do for s in 2 17 37 65 128 300; do
  echo -n "$a seq $s: "; $R $N/$a.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo
done; done
for s in 2 37 300; do echo -n "attn seq $s (2e-3): "; $R $N/attn.sparsec --device cuda --seq $s --check --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo; done
B="--device cuda --bench-decode --prompt-len 20 --max-new-tokens 12 --prefill-rows 7 --session-seq 32 --positions 32"
for m in gpt2_tiny-f16 llama_tiny-bf16; do echo "== $m"; $R $N/$m.sparsec $B --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1; $R $N/$m.sparsec $B --compare-cpu 2>&1 | tail -1; done
python3 $D/gpu_compare.py make /tmp/ck/gpt2 --family gpt2 > /dev/null || exit 1
python3 $D/gpu_compare.py make /tmp/ck/llama --family llama > /dev/null || exit 1
ck() { case $1 in g16) echo /tmp/ck/gpt2;; l16) echo /tmp/ck/llama;; esac; }
for a in g16 l16; do echo -n "new $a 300 in calls of 100 +8 vs CPU: "; $R $N/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1; done
for a in g16 l16; do echo -n "new $a 130 in calls of 45 +3 vs interpreter: "; timeout 200 $R $N/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 130 --max-new-tokens 3 --prefill-rows 45 --positions 256 --session-seq 256 --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1; done
for t in memcheck racecheck; do echo -n "new tiled seq 37 $t: "; timeout 60 compute-sanitizer --tool $t $R $N/tiled.sparsec --device cuda --seq 37 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | head -1; echo; done
bench() { # version model prompt new positions tag
  $R $D/$1/$2.sparsec --weights $(ck $2) --device cuda --bench-decode --prompt-len $3 --max-new-tokens $4 --positions $5 --session-seq 1024 --repeat 5 --json > $J/$1-$2-$6.json 2>$J/$1-$2-$6.err
  python3 -c "import json;b=json.load(open('$J/$1-$2-$6.json'))['bench'];print('$1 $2 prompt $3:', round(b['decode_tokens_per_s'],1), 'tok/s; prefill', round(1e3*b['timing']['prefill_s'],2), 'ms')" || tail -2 $J/$1-$2-$6.err
}
for r in 1 2; do for v in base new; do for a in g16 l16; do
  bench $v $a 128 64 200 p128-$r; bench $v $a 512 64 600 p512-$r; bench $v $a 960 32 1000 p960-$r
done; done; done
python3 - <<'PY'
import json
for a in ['g16','l16']:
    for p in [128, 512, 960]:
        m=json.load(open(f'/tmp/res1/base-{a}-p{p}-1.json'))['bench']['ids']; n=json.load(open(f'/tmp/res1/new-{a}-p{p}-1.json'))['bench']['ids']
        print(a, p, 'new ids equal base ids for the first', next((i for i,(x,y) in enumerate(zip(m,n)) if x!=y), len(m)), 'of', len(m))
PY
python3 $D/prefill_torch.py /tmp/ck/gpt2 float16 > $J/gpt2-torch.json 2>$J/gpt2-torch.err; echo "torch gpt2: $(cat $J/gpt2-torch.json)"
python3 $D/prefill_torch.py /tmp/ck/llama bfloat16 > $J/llama-torch.json 2>$J/llama-torch.err; echo "torch llama: $(cat $J/llama-torch.json)"
for a in g16 l16; do
  timeout 200 ncu --csv --metrics gpu__time_duration.sum --launch-count $(case $a in g16) echo 126;; l16) echo 423;; esac) $R $N/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 512 --max-new-tokens 1 --positions 520 --session-seq 512 > $J/ncu-new-$a.csv 2>/dev/null
  python3 $D/ncu_sum.py $J/ncu-new-$a.csv new-$a
done
tar czf $OUT/results1.tar.gz -C $J .
echo done
