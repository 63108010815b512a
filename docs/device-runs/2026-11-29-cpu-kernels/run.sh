#!/bin/bash
# Device check of 2026-11-29: the CPU kernels of this session (bitmap-indexed
# quantized sparse matmuls, paired flash prefill attention) against the CUDA
# kernels and the reference interpreter, on the same artifacts.
cd "$(dirname "$0")"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for a in lower-matmul-nm-q-f32 lower-matmul-csr-q; do
  for s in 1 5 17; do echo "== $a seq $s"; ./sparsec-run $a --device cuda --compare-cpu --check --seq $s --trust 2>&1 | grep -iE "pass|fail|mismatch|error" ; done
done
for s in 1 64 300; do echo "== attn63 seq $s"; ./sparsec-run attn63 --device cuda --compare-cpu --check --seq $s --trust 2>&1 | grep -iE "pass|fail|mismatch|error"; done
echo "== memcheck attn63 seq 64"; compute-sanitizer --tool memcheck ./sparsec-run attn63 --device cuda --seq 64 --trust 2>&1 | tail -2
