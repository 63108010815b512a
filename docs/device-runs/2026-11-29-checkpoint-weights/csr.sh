#!/usr/bin/env bash
# Device run (issue 16): the CSR warp kernel issuing 4 entries' loads a step
# (new g90) against one entry a step (g90old, the build of run.sh), GPT-2 124M
# with 90% unstructured attention/MLP matrices, weights packed at load from the
# torch checkpoint; g16 (dense f16) alongside.
set -u
D=${D:-.device/v16}; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
R=$D/sparsec-run
python3 $D/gpu_compare.py make /tmp/ck/gpt2 --family gpt2 > /dev/null || exit 1
echo "== new g90 against the interpreter and the CPU"
$R $D/g90.sparsec --weights /tmp/ck/gpt2 --device cuda --bench-decode --prompt-len 20 --max-new-tokens 8 --positions 64 --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
$R $D/g90.sparsec --weights /tmp/ck/gpt2 --device cuda --bench-decode --prompt-len 20 --max-new-tokens 8 --positions 64 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
for t in memcheck racecheck; do echo -n "g90 $t: "; compute-sanitizer --tool $t $R $D/g90.sparsec --weights /tmp/ck/gpt2 --device cuda --bench-decode --prompt-len 10 --max-new-tokens 3 --positions 32 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | head -1; done
echo "== decode after 128 tokens, 128 new, median of 5; alternated, three rounds"
for r in 1 2 3; do for a in g16 g90old g90; do
  $R $D/$a.sparsec --weights /tmp/ck/gpt2 --device cuda --bench-decode --prompt-len 128 --max-new-tokens 128 --repeat 5 --positions 512 --json > $J/$a-$r.json
  python3 -c "import json;b=json.load(open('$J/$a-$r.json'))['bench'];print('$a round $r:', round(b['decode_tokens_per_s'],1), 'tok/s', round(b['decode_ms_per_token'],4), 'ms/token; prefill 128', round(1e3*b['timing']['prefill_s'],2), 'ms')"
done; done
python3 -c "
import json;a,b=(json.load(open('$J/'+v+'-1.json'))['bench']['ids'] for v in ['g90','g90old']);print('g90 ids equal g90old ids:', sum(x==y for x,y in zip(a,b)), 'of', len(a))"
tar czf $OUT/results.tar.gz -C $J .
echo done
