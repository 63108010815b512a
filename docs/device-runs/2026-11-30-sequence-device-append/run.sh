#!/usr/bin/env bash
# Device run (issues 15 and 16): sequence-axis caches appended and compressed
# on the device (`runtime/src/cuda_seq_append.rs`) instead of on a host copy,
# so their sessions replay a captured decode graph. Tiny Llama fixture with
# sequence DCT / PSWF caches (blocks of 4, keep 0.5, 2 sinks, 4 recent) against
# the interpreter and the CPU, graphs on and off; SmolLM2-shaped Llama (bf16,
# f16 caches, placeholder checkpoint made here by torch, seed 0): `ls16` / `lp16`
# (keep 0.5, blocks of 64, 4 sinks, 256 recent) against the CPU and the
# interpreter, memcheck and racecheck; then decode after 2000 and 4000 tokens
# and prefill 2000 against dense `l16`, two rounds.
set -u
D=${D:-.device/v23}; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
R=$D/sparsec-run
python3 $D/gpu_compare.py make /tmp/ck/llama --family llama > /dev/null || exit 1
echo "== tiny Llama, 20-token prompt in calls of 6, 12 decode steps"
for a in tiny-dct tiny-pswf; do for g in "" "--no-graphs"; do
  echo -n "$a $g: "; $R $D/$a.sparsec --device cuda --bench-decode --prompt-len 20 --prefill-rows 6 --max-new-tokens 12 --positions 40 --session-seq 6 $g --check --compare-cpu --atol 1e-4 --rtol 1e-4 2>&1 | grep -E "check_|rror" | tr '\n' ' '; echo
done; done
echo "== SmolLM2-shaped, 400-token prompt in calls of 150, 40 new: against the CPU"
for a in ls16 lp16; do
  $R $D/$a.sparsec --weights /tmp/ck/llama --device cuda --bench-decode --prompt-len 400 --max-new-tokens 40 --prefill-rows 150 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
done
echo "== 400-token prompt, 4 new: against the interpreter"
for a in ls16 lp16; do
  $R $D/$a.sparsec --weights /tmp/ck/llama --device cuda --bench-decode --prompt-len 400 --max-new-tokens 4 --positions 512 --session-seq 512 --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
done
for t in memcheck racecheck; do echo -n "ls16 $t: "; timeout 200 compute-sanitizer --tool $t $R $D/ls16.sparsec --weights /tmp/ck/llama --device cuda --bench-decode --prompt-len 340 --max-new-tokens 3 --positions 512 --session-seq 512 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | head -1; echo; done
echo "== decode after 2000 / 4000 tokens (64 new, median of 3), prefill 2000"
for r in 1 2; do for a in l16 ls16 lp16; do for p in 2000 4000; do
  $R $D/$a.sparsec --weights /tmp/ck/llama --device cuda --bench-decode --prompt-len $p --max-new-tokens 64 --repeat 3 --positions $((p + 100)) --session-seq 512 --json > $J/$a-$p-$r.json 2>$J/$a-$p-$r.err
  python3 -c "import json;b=json.load(open('$J/$a-$p-$r.json'))['bench'];print('r$r $a prompt $p:', round(b['decode_tokens_per_s'],1), 'tok/s; prefill', round(1e3*b['timing']['prefill_s'],1), 'ms')" || tail -2 $J/$a-$p-$r.err
done; done; done
tar czf $OUT/results.tar.gz -C $J .
echo done
