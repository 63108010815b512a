#!/usr/bin/env bash
# Device run (issue 16): prefill. new = tensor-core matmuls (nt up to 4
# n-tiles a warp) + generation's prefill running the row-local tail (final
# norm, LM head) on the last row only; nt1 = new with one n-tile a warp (more
# warps); mid = 7898e8f.
set -u
D=${D:-.device/v11}; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
N=$D/new; R=$N/sparsec-run
echo "== tiny models: steps vs the interpreter and the CPU; the last row alone vs a full call"
B="--device cuda --bench-decode --prompt-len 20 --max-new-tokens 12 --prefill-rows 7 --session-seq 32 --positions 32"
for m in gpt2_tiny-f16 llama_tiny-f16 llama_tiny-bf16; do
  A=$N/$m.sparsec; echo "== $m"
  $R $A $B --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
  $R $A $B --compare-cpu 2>&1 | tail -1
  for ss in 32 6; do
    $R $A --device cuda --bench-decode --prompt-len 20 --max-new-tokens 8 --positions 32 --session-seq $ss --json > $J/$m-$ss.json
    python3 -c "import json;a=json.load(open('$J/$m-$ss.json'))['bench'];print('session seq $ss: device greedy = host argmax:',a['host_argmax_ids_equal'],'; last row alone vs full call:',a['last_row_max_abs_diff'])"
  done
done
echo -n "gpt2_tiny-f16 memcheck (tail): "; compute-sanitizer --tool memcheck $R $N/gpt2_tiny-f16.sparsec --device cuda --bench-decode --prompt-len 20 --max-new-tokens 3 --session-seq 6 --positions 32 2>&1 | grep -E "ERROR SUMMARY" | head -1
for f in gpt2 llama; do python3 $D/gpu_compare.py make /tmp/ck/$f --family $f > /dev/null || exit 1; done
for v in mid new nt1; do for a in gpt2-f16 llama-bf16; do python3 $D/gpu_compare.py pack /tmp/ck/${a%%-*} $D/$v/$a.sparsec > /dev/null || exit 1; done; done
echo "== prefill (128 and 960 tokens) and decode; mid, new, nt1 alternated"
for r in 1 2; do for v in mid new nt1; do for a in gpt2-f16 llama-bf16; do for p in 128 960; do
  $D/$v/sparsec-run $D/$v/$a.sparsec --trust --device cuda --bench-decode --prompt-len $p --max-new-tokens 64 --repeat 5 --positions 1024 --session-seq 1024 --json > $J/$v-$a-$p-$r.json
  python3 -c "import json;b=json.load(open('$J/$v-$a-$p-$r.json'))['bench'];print('$v $a prompt $p round $r: prefill', round(1e3*b['timing']['prefill_s'],2), 'ms', round(b['prefill_tokens_per_s']), 'tok/s; decode', round(b['decode_tokens_per_s'],1), 'tok/s; last row diff', b.get('last_row_max_abs_diff'))"
done; done; done; done
python3 - <<'PY'
import json
for v in ['new','nt1']:
  for a in ['gpt2-f16','llama-bf16']:
    for p in [128, 960]:
        m=json.load(open(f'/tmp/res/mid-{a}-{p}-1.json'))['bench']['ids']; n=json.load(open(f'/tmp/res/{v}-{a}-{p}-1.json'))['bench']['ids']
        print(v, a, p, 'ids equal mid ids for the first', next((i for i,(x,y) in enumerate(zip(m,n)) if x!=y), len(m)), 'of', len(m))
PY
echo "== ncu: one 960-token prefill (new, gpt2-f16), first 140 launches"
timeout 150 ncu --clock-control none --metrics gpu__time_duration.sum --csv --launch-count 140 $R $N/gpt2-f16.sparsec --trust --device cuda --bench-decode --prompt-len 960 --max-new-tokens 1 --repeat 1 --positions 1024 --session-seq 1024 --no-graphs > $J/ncu-prefill.csv 2>$J/ncu-prefill.err; echo "ncu exit $?"
tar czf $OUT/results.tar.gz -C $J .
echo done
