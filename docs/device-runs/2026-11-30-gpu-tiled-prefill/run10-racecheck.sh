#!/usr/bin/env bash
# Racecheck of the split decode attention (issue 16's open check): tiny Llama
# (bf16 weights, f16 caches), a 600-token prompt, so decode rows split their
# keys over 3 blocks per head with the ticket counter; plus memcheck, synccheck
# and the CUDA session against the CPU session over the same steps.
set -u
D=${D:-.device/v21}; R=$D/sparsec-run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
A="$D/lt.sparsec --device cuda --bench-decode --prompt-len 600 --max-new-tokens 4 --positions 700 --session-seq 256"
echo -n "compare-cpu 600 + 40: "; $R $D/lt.sparsec --device cuda --bench-decode --prompt-len 600 --max-new-tokens 40 --positions 700 --session-seq 256 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
for t in racecheck synccheck memcheck; do echo -n "$t: "; timeout 250 compute-sanitizer --tool $t $R $A --no-graphs 2>&1 | grep -E "RACECHECK SUMMARY|ERROR SUMMARY" | head -1; echo; done
echo done
