#!/usr/bin/env bash
# Seventh call: ncu stall reasons of new3's prefill matmul (q/k/v, 512 x 768 x 768,
# 32-row tiles) and attention (512 rows, 12 heads), GPT-2 124M.
set -u
D=${D:-.device/v20}; J=/tmp/res7; mkdir -p $J /tmp/ck
R=$D/new3/sparsec-run
python3 $D/gpu_compare.py make /tmp/ck/gpt2 --family gpt2 > /dev/null || exit 1
for k in k5_matmul_add k6_attention k9_matmul_add_add; do
  timeout 150 ncu --kernel-name $k --launch-skip 1 --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis $R $D/new3/g16.sparsec --weights /tmp/ck/gpt2 --device cuda --bench-decode --prompt-len 512 --max-new-tokens 1 --positions 520 --session-seq 512 > $J/ncu-$k.txt 2>&1
  grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|L1/TEX Hit|L2 Hit|Warp Cycles Per Issued|Issued Warp|No Eligible|Active Warps Per|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Stall|stall|Executed Ipc|Eligible Warps|est. speedup|Block Size|Grid Size" $J/ncu-$k.txt | head -60
  echo ----
done
tar czf $OUT/results7.tar.gz -C $J .
echo done
