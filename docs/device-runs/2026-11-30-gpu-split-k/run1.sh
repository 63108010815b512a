#!/usr/bin/env bash
# Split k in the tiled prefill matmul (issue 16). base = e3f8733 (its own
# sparsec-run, manifest 14); new = the split-k tree (manifest 15). Checks of the
# split-k filetest and the models against the interpreter and the CPU,
# sanitizers, base and new prefill/decode alternated in two rounds (default
# split MMAs and --gpu-mma-activations half), PyTorch's prefill, ncu of new.
set -u
V=.device/v27; J=/tmp/res1; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
R=$V/new/sparsec-run; RB=$V/base/sparsec-run
echo "== split-k filetest vs the interpreter and the CPU"
for s in 2 37 130 300 513; do echo -n "splitk seq $s (1e-4): "; $R $V/new/splitk.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo; done
for s in 37 300; do echo -n "splitkh seq $s (5e-2): "; $R $V/new/splitkh.sparsec --device cuda --seq $s --check --compare-cpu --atol 5e-2 --rtol 5e-2 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo; done
echo -n "splitk seq 300, 20 runs: "; $R $V/new/splitk.sparsec --device cuda --seq 300 --repeat 20 --check 2>&1 | grep -E "check_reference|rror" | tr '\n' ' '; echo
for t in memcheck racecheck synccheck; do echo -n "splitk seq 300 $t: "; timeout 120 compute-sanitizer --tool $t $R $V/new/splitk.sparsec --device cuda --seq 300 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | head -1; echo; done
python3 benches/gpu_compare.py make /tmp/ck/gpt2 --family gpt2 > /dev/null || exit 1
python3 benches/gpu_compare.py make /tmp/ck/llama --family llama > /dev/null || exit 1
ck() { case $1 in g16*) echo /tmp/ck/gpt2;; l16*) echo /tmp/ck/llama;; esac; }
echo "== models"
for a in g16 l16 g16h l16h; do echo -n "new $a 300 in calls of 100 +8 vs CPU: "; $R $V/new/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1; done
for a in g16 l16; do echo -n "new $a 130 in calls of 45 +3 vs interpreter: "; timeout 200 $R $V/new/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 130 --max-new-tokens 3 --prefill-rows 45 --positions 256 --session-seq 256 --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1; done
echo -n "new g16 memcheck prompt 64: "; timeout 240 compute-sanitizer --tool memcheck $R $V/new/g16.sparsec --weights /tmp/ck/gpt2 --device cuda --bench-decode --prompt-len 64 --max-new-tokens 2 --positions 128 --session-seq 128 2>&1 | grep -E "ERROR SUMMARY" | head -1; echo
bench() { # runner dir model prompt new positions tag round
  $1 $2/$3.sparsec --weights $(ck $3) --device cuda --bench-decode --prompt-len $4 --max-new-tokens $5 --positions $6 --session-seq 1024 --repeat 5 --json > $J/$7-$3-p$4-$8.json 2>$J/$7-$3-p$4-$8.err
  python3 -c "import json;b=json.load(open('$J/$7-$3-p$4-$8.json'))['bench'];print('$7 $3 prompt $4 r$8:', round(b['decode_tokens_per_s'],1), 'tok/s; prefill', round(1e3*b['timing']['prefill_s'],3), 'ms')" || tail -2 $J/$7-$3-p$4-$8.err
}
echo "== bench"
for r in 1 2; do for v in base new; do RR=$R; [ $v = base ] && RR=$RB; for a in g16 l16 g16h l16h; do
  bench $RR $V/$v $a 128 64 200 $v $r; bench $RR $V/$v $a 512 64 600 $v $r; bench $RR $V/$v $a 960 32 1000 $v $r
done; done; done
python3 - <<'PY'
import json
for a in ['g16','l16','g16h','l16h']:
    for p in [128, 512, 960]:
        m=json.load(open(f'/tmp/res1/base-{a}-p{p}-1.json'))['bench']['ids']
        n=json.load(open(f'/tmp/res1/new-{a}-p{p}-1.json'))['bench']['ids']
        print(a, p, 'new ids equal base ids for the first', next((i for i,(x,y) in enumerate(zip(m,n)) if x!=y), len(m)), 'of', len(m))
PY
timeout 200 python3 benches/gpu_compare.py torch-prefill /tmp/ck/gpt2 --dtype float16 > $J/gpt2-torch.json 2>$J/gpt2-torch.err; echo "torch gpt2: $(cat $J/gpt2-torch.json)"
timeout 200 python3 benches/gpu_compare.py torch-prefill /tmp/ck/llama --dtype bfloat16 > $J/llama-torch.json 2>$J/llama-torch.err; echo "torch llama: $(cat $J/llama-torch.json)"
for a in g16 g16h l16; do
  timeout 200 ncu --csv --metrics gpu__time_duration.sum --launch-count $(case $a in g16*) echo 126;; l16*) echo 423;; esac) $R $V/new/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 512 --max-new-tokens 1 --positions 520 --session-seq 512 > $J/ncu-new-$a.csv 2>/dev/null
  python3 benches/gpu_compare.py ncu-summary $J/ncu-new-$a.csv new-$a
done
tar czf $OUT/results1.tar.gz -C $J .
echo done
