#!/usr/bin/env bash
# Device check of the compression formats: quantized sparse values (nm/csr/bsr x q8/q4) and low rank on CUDA vs the reference and the CPU.
R=.device/sparsec-run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for a in nm24q4 nm24q8 u50q4 u80q8 bsrq4 lrsvd; do
  for s in 1 17 64; do
    echo "== $a seq $s"
    $R .device/art/$a.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | tail -3
  done
done
echo "== memcheck"
for a in nm24q4 u50q4 bsrq4 lrsvd; do
  compute-sanitizer --tool memcheck $R .device/art/$a.sparsec --device cuda --seq 17 2>&1 | grep -E "ERROR SUMMARY" | head -2
done
