#!/usr/bin/env bash
# Device run (issue 16, twenty-eighth session): block-quantized weights
# (Q8_0, Q4_1) in the tensor-core tiled prefill matmul. Checks against the
# interpreter and the CPU, sanitizers on 2-layer models, prefill and decode of
# GPT-2 124M and the SmolLM2-shaped Llama in f16/bf16, q8_0 and q4_1, three
# rounds alternated, the warp-GEMV prefill they replace, and PyTorch's
# prefill on the same weights.
set -u
V=.device/v52; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
R=$V/sparsec-run
for f in gpt2 llama; do python3 $V/gpu_compare.py make /tmp/ck/$f --family $f > /dev/null || exit 1; done
python3 $V/gpu_compare.py make /tmp/ck/gpt2l2 --family gpt2 --layers 2 --vocab 4096 > /dev/null || exit 1
python3 $V/gpu_compare.py make /tmp/ck/llamal2 --family llama --layers 2 --vocab 4096 > /dev/null || exit 1
ck() { case $1 in g2*) echo /tmp/ck/gpt2l2;; l2*) echo /tmp/ck/llamal2;; g*) echo /tmp/ck/gpt2;; l*) echo /tmp/ck/llama;; esac; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
bench() { # artifact prompt round
  $R $V/$1.sparsec --weights $(ck $1) --trust --device cuda --bench-decode --prompt-len $2 --max-new-tokens 128 --positions 1024 --session-seq 1024 --repeat 5 --json > $J/$1-p$2-$3.json 2>$J/$1-p$2-$3.err
  python3 -c "import json;b=json.load(open('$J/$1-p$2-$3.json'))['bench'];t=b['timing'];print('$1 p$2 r$3: prefill', round(1e3*t['prefill_s'],3), 'ms; decode', round(t['new_tokens']/t['decode_s'],1), 'tok/s')" || tail -2 $J/$1-p$2-$3.err
}
echo "== checks"
for s in 2 37 130 300; do echo -n "filetest seq $s: "; $R $V/ft.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo; done
for a in gq8 gq4 lq8 lq4; do
  echo -n "$a vs CPU, 300-token prompt in calls of 100 + 8: "
  $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
  echo -n "$a vs CPU, 513-token prompt in one call + 2: "
  $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 513 --max-new-tokens 2 --positions 1024 --session-seq 1024 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
done
echo "== prefill and decode (128 new tokens), medians of 5, alternated"
for a in g16 gq8 gq4 l16 lq8 lq4; do bench $a 128 1; done
for r in 1 2 3; do for a in g16 gq8 gq4 l16 lq8 lq4; do bench $a 512 $r; done; done
echo "== before: quantized prefill as the warp GEMV (artifacts compiled with the tiles off)"
for a in gq8-old gq4-old lq4-old; do bench $a 128 1; bench $a 512 1; done
echo "== PyTorch prefill on the same weights"
timeout 200 python3 $V/gpu_compare.py torch-prefill /tmp/ck/gpt2 --dtype float16 --lengths 128,512 > $J/gpt2-torch-prefill.json 2>$J/gpt2-torch-prefill.err; echo "exit $?"; cat $J/gpt2-torch-prefill.json; echo
timeout 200 python3 $V/gpu_compare.py torch-prefill /tmp/ck/llama --dtype bfloat16 --lengths 512 > $J/llama-torch-prefill.json 2>$J/llama-torch-prefill.err; echo "exit $?"; cat $J/llama-torch-prefill.json; echo
echo "== sanitizers (2-layer models, 300 in calls of 100, + 2)"
for a in g2q4 l2q8; do for t in racecheck memcheck; do echo -n "$a $t: "; timeout 150 compute-sanitizer --tool $t $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --prefill-rows 100 --max-new-tokens 2 --positions 512 --session-seq 512 2>&1 | grep -E "RACECHECK SUMMARY|ERROR SUMMARY" | head -1; echo " (exit ${PIPESTATUS[0]})"; done; done
tar czf $OUT/results.tar.gz -C $J .
echo done
