#!/usr/bin/env bash
# Device run (issue 16): tensor-core matmuls with 16-byte fragment loads
# (k a multiple of 32: a lane takes 8 consecutive k of each 32). prev = 40edfde
# (scalar fragment loads), new = this change; one sparsec-run (runtime unchanged).
set -u
D=${D:-.device/v13}; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
R=$D/sparsec-run; N=$D/new
echo "== tensor-core kernels vs the interpreter and the CPU"
for a in mma wide2; do for s in 1 2 5 16 17 37 128; do
  echo -n "$a seq $s: "; $R $N/$a.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo
done; done
B="--device cuda --bench-decode --prompt-len 20 --max-new-tokens 12 --prefill-rows 7 --session-seq 32 --positions 32"
for m in gpt2_tiny-f16 llama_tiny-f16 llama_tiny-bf16; do
  A=$N/$m.sparsec; echo "== $m"
  $R $A $B --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
  $R $A $B --compare-cpu 2>&1 | tail -1
  $R $A --device cuda --bench-decode --prompt-len 20 --max-new-tokens 8 --positions 32 --session-seq 6 --json > $J/$m.json
  python3 -c "import json;a=json.load(open('$J/$m.json'))['bench'];print('device greedy = host argmax:',a['host_argmax_ids_equal'],'; last row alone vs full call:',a['last_row_max_abs_diff'])"
done
for m in gpt2_tiny-f16 llama_tiny-bf16; do for t in memcheck racecheck; do
  echo -n "$m $t: "; compute-sanitizer --tool $t $R $N/$m.sparsec --device cuda --bench-decode --prompt-len 20 --max-new-tokens 3 --session-seq 6 --positions 32 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | head -1
done; done
echo -n "wide2 memcheck: "; compute-sanitizer --tool memcheck $R $N/wide2.sparsec --device cuda --seq 37 2>&1 | grep -E "ERROR SUMMARY" | head -1
for f in gpt2 llama; do python3 $D/gpu_compare.py make /tmp/ck/$f --family $f > /dev/null || exit 1; done
for v in prev new; do for a in gpt2-f16 llama-bf16; do python3 $D/gpu_compare.py pack /tmp/ck/${a%%-*} $D/$v/$a.sparsec > /dev/null || exit 1; done; done
echo "== 124M models: CUDA session vs the CPU session"
for a in gpt2-f16 llama-bf16; do $R $N/$a.sparsec --trust --device cuda --bench-decode --prompt-len 40 --max-new-tokens 6 --prefill-rows 17 --compare-cpu --atol 1e-3 --rtol 1e-3 2>&1 | tail -1; done
echo "== prefill and decode, prev and new alternated"
for r in 1 2; do for v in prev new; do for a in gpt2-f16 llama-bf16; do for p in 128 512 960; do
  $R $D/$v/$a.sparsec --trust --device cuda --bench-decode --prompt-len $p --max-new-tokens 64 --repeat 5 --positions 1024 --session-seq 1024 --json > $J/$v-$a-$p-$r.json
  python3 -c "import json;b=json.load(open('$J/$v-$a-$p-$r.json'))['bench'];print('$v $a prompt $p round $r: prefill', round(1e3*b['timing']['prefill_s'],2), 'ms; decode', round(b['decode_tokens_per_s'],1), 'tok/s; last row diff', b.get('last_row_max_abs_diff'))"
done; done; done; done
python3 - <<'PY'
import json
for a in ['gpt2-f16','llama-bf16']:
    for p in [128, 512, 960]:
        m=json.load(open(f'/tmp/res/prev-{a}-{p}-1.json'))['bench']['ids']; n=json.load(open(f'/tmp/res/new-{a}-{p}-1.json'))['bench']['ids']
        print(a, p, 'new ids equal prev ids for the first', next((i for i,(x,y) in enumerate(zip(m,n)) if x!=y), len(m)), 'of', len(m))
PY
tar czf $OUT/results.tar.gz -C $J .
echo done
