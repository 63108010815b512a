#!/usr/bin/env bash
# Device run 3 for issue 16: the warp matmul for Q8_0/Q4_0/Q4_1 weights and the
# restructured f32 one: whole sequences and sessions against the interpreter and the CPU.
set -u
D=.h16dev; R=$D/sparsec-run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for a in lower-matmul-quantized lower-matmul-int8 lower-fusion-activation lower-matmul-transposed-vector; do
  for s in 1 17 64; do echo "== $a seq $s"; $R $D/art/$a.sparsec --device cuda --seq $s --check --compare-cpu | tail -2; done
done
for m in gpt2_tiny llama_tiny; do
  echo "== $m: session vs interpreter and CPU"
  $R $D/art/$m.sparsec --device cuda --bench-decode --prompt-len 10 --max-new-tokens 12 --prefill-rows 6 --session-seq 4 --positions 32 --check --compare-cpu
done
echo "== memcheck"
compute-sanitizer --tool memcheck $R $D/art/lower-matmul-quantized.sparsec --device cuda --seq 17 2>&1 | grep "ERROR SUMMARY"
compute-sanitizer --tool memcheck $R $D/art/gpt2_tiny.sparsec --device cuda --bench-decode --prompt-len 10 --max-new-tokens 4 --session-seq 4 --positions 32 2>&1 | grep "ERROR SUMMARY"
