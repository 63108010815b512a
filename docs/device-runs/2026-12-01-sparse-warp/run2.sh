#!/usr/bin/env bash
# Device run (issue 16, twenty-fifth session): the warp-per-output sparse
# kernels with 4, 8 and 16 entries per lane and step (their loads issued
# together): GPT-2 124M decode after 128 tokens, alternated, and the session
# check of each variant against the CPU.
set -u
V=.device/v42; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
R=$V/sparsec-run
python3 $V/gpu_compare.py make /tmp/ck/gpt2 --family gpt2 > /dev/null || exit 1
for u in 8 16; do for m in nm24 u90q8 bsr; do
  echo -n "$m-u$u: "; $R $V/$m-u$u.sparsec --weights /tmp/ck/gpt2 --device cuda --bench-decode --prompt-len 20 --max-new-tokens 8 --prefill-rows 7 --positions 64 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
done; done
bench() { # artifact prompt round
  $R $V/$1.sparsec --weights /tmp/ck/gpt2 --trust --device cuda --bench-decode --prompt-len $2 --max-new-tokens 128 --repeat 5 --positions 1024 --json > $J/$1-p$2-$3.json 2>$J/$1-p$2-$3.err
  python3 -c "import json;b=json.load(open('$J/$1-p$2-$3.json'))['bench'];print('$1 p$2 r$3: decode', round(b['decode_tokens_per_s'],1), 'tok/s; prefill', round(1e3*b['timing']['prefill_s'],3), 'ms')" || tail -2 $J/$1-p$2-$3.err
}
for r in 1 2; do bench dense 128 $r; for m in nm24 nm24q4 u90q8 bsr; do for u in 4 8 16; do bench $m-u$u 128 $r; done; done; done
tar czf $OUT/results.tar.gz -C $J .
echo done
