#!/usr/bin/env bash
# Device run (issue 16, twenty-seventh session): what bounds the tensor-core
# prefill attention and the tiled prefill matmuls at 512 rows of GPT-2 124M
# f16 (ncu --set full on one launch of each), for the next attempt.
set -u
V=.device/v50; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
R=$V/sparsec-run
python3 $V/gpu_compare.py make /tmp/ck/gpt2 --family gpt2 > /dev/null || exit 1
for k in k6_attention k9_matmul_add_add k5_matmul_add; do
  timeout 150 ncu --set full -k regex:$k --launch-skip 0 --launch-count 1 --import-source no --print-details all $R $V/g16-base.sparsec --weights /tmp/ck/gpt2 --trust --device cuda --bench-decode --prompt-len 512 --max-new-tokens 1 --positions 1024 --session-seq 1024 > $J/ncu-full-$k.txt 2>&1
  echo "$k exit $?"; grep -E "Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Warp Cycles Per Issued|Issued Warp|Eligible Warps|No Eligible|Memory Throughput|Compute \(SM\)|L1/TEX Hit|L2 Hit|Stall|Bank" $J/ncu-full-$k.txt | head -40
done
tar czf $OUT/ncu.tar.gz -C $J .
echo done
