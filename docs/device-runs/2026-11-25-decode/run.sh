#!/usr/bin/env bash
# Device check: every artifact on CUDA against the reference and the CPU.
R=target/debug/sparsec-run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for a in lower-attention lower-attention-window lower-softmax lower-fusion lower-matmul-quantized llama_tiny gpt2_tiny; do
  for s in 1 17 300; do
    case $a in gpt2_tiny) [ $s -gt 32 ] && s=32;; esac
    echo "== $a seq $s"
    $R devrun/$a.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | tail -4
  done
done
echo "== memcheck"
for a in lower-attention lower-attention-window llama_tiny; do
  compute-sanitizer --tool memcheck $R devrun/$a.sparsec --device cuda --seq 17 2>&1 | grep -E "ERROR SUMMARY|error" | head -3
done
