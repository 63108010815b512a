#!/usr/bin/env bash
# NSA with `bound` block summaries stored as f16 pairs, minima rounded down
# and maxima up (issue 14, twenty-third session): the CUDA session against
# the interpreter and the CPU session for
# bound, mean and gated NSA on the tiny Llama (f16 and f32 caches),
# sanitizers, the SmolLM2-shaped Llama against the CPU session, and its
# decode after 4096 tokens.
set -u
V=.device/v40; R=$V/sparsec-run; export PYTHONUNBUFFERED=1
mkdir -p $OUT; exec > >(tee $OUT/log) 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for a in tiny_bound_f16 tiny_bound_f32 tiny_mean_f16 tiny_mean_f32 tiny_gated_f16 tiny_gated_f32; do
  echo -n "$a: 40-token prompt in calls of 7, 12 decode steps: "
  $R $V/$a.sparsec --device cuda --bench-decode --prompt-len 40 --max-new-tokens 12 --prefill-rows 7 --positions 64 --session-seq 16 --check --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -2 | tr '\n' ' '; echo
done
for a in tiny_bound_f16 tiny_gated_f16; do
  for t in memcheck racecheck; do echo -n "$a $t: "; timeout 120 compute-sanitizer --tool $t $R $V/$a.sparsec --device cuda --bench-decode --prompt-len 40 --max-new-tokens 4 --prefill-rows 7 --positions 64 --session-seq 16 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | head -1; echo; done
done
mkdir -p /tmp/ck
python3 benches/gpu_compare.py make /tmp/ck/llama --family llama > /dev/null || exit 1
echo -n "l16_nsa: 1100-token prompt in calls of 512, 8 decode steps vs CPU: "
$R $V/l16_nsa.sparsec --weights /tmp/ck/llama --device cuda --bench-decode --prompt-len 1100 --max-new-tokens 8 --prefill-rows 512 --positions 1200 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
for r in 1 2; do
  $R $V/l16_nsa.sparsec --weights /tmp/ck/llama --device cuda --bench-decode --prompt-len 4096 --max-new-tokens 64 --positions 4200 --repeat 2 --json > /tmp/nsa-4096-$r.json 2>/tmp/nsa-4096-$r.err
  python3 -c "import json;b=json.load(open('/tmp/nsa-4096-$r.json'))['bench'];print('l16_nsa after 4096, round $r:', round(b['decode_tokens_per_s'],1), 'tok/s')" || tail -2 /tmp/nsa-4096-$r.err
done
echo done
