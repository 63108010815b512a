#!/usr/bin/env bash
# Device check: every artifact on CUDA against the reference and the CPU.
R=target/debug/sparsec-run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
grep -E "AnonHugePages" /proc/meminfo; cat /sys/kernel/mm/transparent_hugepage/enabled
for a in lower-fusion-activation lower-fusion lower-attention llama_tiny gpt2_tiny; do
  for s in 1 17 300; do
    case $a in gpt2_tiny) [ $s -gt 32 ] && s=32;; esac
    echo "== $a seq $s"
    $R devrun/$a.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | tail -4
  done
done
echo "== mapped weights (SPARSEC_WEIGHTS=mmap)"
SPARSEC_WEIGHTS=mmap $R devrun/gpt2_tiny.sparsec --device cuda --seq 17 --check --compare-cpu 2>&1 | tail -3
echo "== memcheck"
for a in lower-fusion-activation gpt2_tiny; do
  compute-sanitizer --tool memcheck $R devrun/$a.sparsec --device cuda --seq 17 2>&1 | grep -E "ERROR SUMMARY|error" | head -3
done
