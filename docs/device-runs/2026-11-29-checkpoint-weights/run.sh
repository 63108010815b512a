#!/usr/bin/env bash
# Device run (issue 16, item 5): artifacts compiled on the dev box with
# --strip-weights from placeholder checkpoints (only code and manifests
# travel), the real checkpoints made here (torch, seed 0) and packed at load by
# `sparsec-run --weights` (no Python packing). GPT-2 124M f16, the same model
# with its attention and MLP matrices 90% unstructured (pruned by magnitude at
# load, f32 values in CSR; embeddings and LM head f16), and a SmolLM2-shaped
# Llama in bf16: checked against the interpreter and the CPU, then decode
# speed (the target: the 90% model decodes faster than the dense one).
set -u
D=${D:-.device/v15}; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
R=$D/sparsec-run
for f in gpt2 llama; do python3 $D/gpu_compare.py make /tmp/ck/$f --family $f > /dev/null || exit 1; done
ck() { case $1 in g*) echo /tmp/ck/gpt2;; *) echo /tmp/ck/llama;; esac; }
du -sh $D/*.sparsec /tmp/ck/*
echo "== packed at load: 20-token prompt, 8 new, against the interpreter (--check) and the CPU (--compare-cpu)"
for a in g16 g90 l16; do
  t0=$(date +%s.%N)
  $R $D/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 20 --max-new-tokens 8 --positions 64 --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
  t1=$(date +%s.%N)
  $R $D/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 20 --max-new-tokens 8 --positions 64 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
  python3 -c "print('$a check call: %.1f s' % ($t1 - $t0))"
done
echo -n "g90 memcheck: "; compute-sanitizer --tool memcheck $R $D/g90.sparsec --weights /tmp/ck/gpt2 --device cuda --bench-decode --prompt-len 10 --max-new-tokens 3 --positions 32 2>&1 | grep "ERROR SUMMARY"
echo "== decode after a 128-token prompt, 128 new, median of 5; g16, g90, l16 alternated, two rounds"
for r in 1 2; do for a in g16 g90 l16; do
  t0=$(date +%s.%N)
  $R $D/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 128 --max-new-tokens 128 --repeat 5 --positions 512 --json > $J/$a-$r.json
  t1=$(date +%s.%N)
  python3 -c "import json;b=json.load(open('$J/$a-$r.json'))['bench'];print('$a round $r:', round(b['decode_tokens_per_s'],1), 'tok/s', round(b['decode_ms_per_token'],4), 'ms/token; prefill 128', round(1e3*b['timing']['prefill_s'],2), 'ms; whole call %.1f s' % ($t1 - $t0))"
done; done
echo "== prefill of 512 tokens (median of 5), g16 and g90"
for a in g16 g90; do
  $R $D/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 512 --max-new-tokens 16 --repeat 5 --positions 1024 --session-seq 1024 --json > $J/p512-$a.json
  python3 -c "import json;b=json.load(open('$J/p512-$a.json'))['bench'];print('$a prompt 512: prefill', round(1e3*b['timing']['prefill_s'],2), 'ms')"
done
tar czf $OUT/results.tar.gz -C $J .
echo done
