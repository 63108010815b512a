#!/usr/bin/env bash
# Device check after the hardening: every format on CUDA against the reference
# and the CPU, a corrupted artifact refused on the CUDA path, memcheck.
R=.device/sparsec-run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for a in dense q4_1 csr nm bsr baked llama_tiny gpt2_tiny; do
  for s in 1 17 300; do
    case $a in gpt2_tiny) [ $s -gt 32 ] && s=32;; llama_tiny) [ $s -gt 64 ] && s=64;; esac
    echo "== $a seq $s"
    $R .device/art/$a.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | tail -3
  done
done
echo "== corrupted weights on cuda (must be refused)"
$R .device/art/corrupt.sparsec --device cuda --seq 4; echo "exit $?"
echo "== past the position table on cuda (must be refused)"
$R .device/art/gpt2_tiny.sparsec --device cuda --seq 33; echo "exit $?"
echo "== memcheck"
for a in csr q4_1 llama_tiny gpt2_tiny; do
  compute-sanitizer --tool memcheck $R .device/art/$a.sparsec --device cuda --seq 17 2>&1 | grep -E "ERROR SUMMARY" | head -2
done
R=.device/sparsec-run
for s in 1 17 300; do echo "== q4_1 (f32 activations) seq $s"; $R .device/art/q4_1f32.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | tail -2; done
for s in 17; do echo "== q4_1 (int8 activations on the CPU) seq $s, CPU tolerance 0.15"; $R .device/art/q4_1.sparsec --device cuda --seq $s --check --compare-cpu --atol 0.15 --rtol 0.05 2>&1 | tail -2; done
