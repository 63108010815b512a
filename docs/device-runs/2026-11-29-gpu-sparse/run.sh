#!/usr/bin/env bash
# Device run (issue 16): CSR weights on the GPU a warp per output element
# (new) against a thread per output (old); a 90% unstructured GPT-2-width
# model (6 layers, vocab 4096, placeholder weights pruned by magnitude at
# compile time, f32 values + 16-bit indices) against the same model dense
# (f16 weights, packed here from the same deterministic placeholder).
set -u
D=${D:-.device/v14}; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
R=$D/sparsec-run
cp $D/sparse.sparsec/weights.safetensors $D/sparse-old.sparsec/
echo "== CSR kernels vs the interpreter and the CPU"
for s in 1 5 37; do echo -n "csr seq $s: "; $R $D/csr.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo; done
echo -n "csr memcheck: "; compute-sanitizer --tool memcheck $R $D/csr.sparsec --device cuda --seq 5 2>&1 | grep "ERROR SUMMARY"
for v in sparse sparse-old; do
  echo "== $v: session vs the interpreter and the CPU"
  $R $D/$v.sparsec --device cuda --bench-decode --prompt-len 20 --max-new-tokens 8 --prefill-rows 7 --positions 64 --check 2>&1 | tail -1
  $R $D/$v.sparsec --device cuda --bench-decode --prompt-len 20 --max-new-tokens 8 --prefill-rows 7 --positions 64 --compare-cpu 2>&1 | tail -1
done
echo -n "sparse memcheck: "; compute-sanitizer --tool memcheck $R $D/sparse.sparsec --device cuda --bench-decode --prompt-len 10 --max-new-tokens 3 --positions 32 2>&1 | grep "ERROR SUMMARY"
python3 $D/gpu_compare.py make /tmp/ck/g6 --family gpt2 --placeholder --vocab 4096 --layers 6 > /dev/null && python3 $D/gpu_compare.py pack /tmp/ck/g6 $D/dense.sparsec > /dev/null || exit 1
echo "== decode after 128 tokens, 128 new, median of 5; alternated"
for r in 1 2; do for v in dense sparse sparse-old; do
  $R $D/$v.sparsec --trust --device cuda --bench-decode --prompt-len 128 --max-new-tokens 128 --repeat 5 --positions 512 --json > $J/$v-$r.json
  python3 -c "import json;b=json.load(open('$J/$v-$r.json'))['bench'];print('$v round $r: decode', round(b['decode_tokens_per_s'],1), 'tok/s', round(b['decode_ms_per_token'],4), 'ms; prefill', round(1e3*b['timing']['prefill_s'],2), 'ms')"
done; done
python3 -c "
import json;a,b=(json.load(open('$J/'+v+'-1.json'))['bench']['ids'] for v in ['sparse','sparse-old']);print('sparse ids equal sparse-old ids:', a==b)"
tar czf $OUT/results.tar.gz -C $J .
echo done
