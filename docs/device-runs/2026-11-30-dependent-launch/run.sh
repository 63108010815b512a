#!/usr/bin/env bash
# Device run (issue 16, twentieth session): compiled kernels open with
# griddepcontrol.wait / launch_dependents (sm_90) and sessions launch them with
# programmatic stream serialization (cuLaunchKernelEx), so a kernel's launch
# overlaps the kernel before it, in CUDA graphs too. Checks (interpreter, CPU,
# sanitizers) with it on, then decode and prefill with it on (`on`) and off
# (`--no-dependent-launch`, `off`) alternated, and PyTorch's graph on the same
# weights in the same call (SKIP_TORCH=1: not).
set -u
V=.device/v30; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
R=$V/sparsec-run
for f in gpt2 llama; do python3 $V/gpu_compare.py make /tmp/ck/$f --family $f > /dev/null || exit 1; done
ck() { case $1 in g*) echo /tmp/ck/gpt2;; l*) echo /tmp/ck/llama;; esac; }
echo "== checks, dependent launch on"
for a in g16 l16 g90; do
  echo -n "$a vs CPU, 300-token prompt in calls of 100 + 8: "
  $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
done
echo -n "g16 vs interpreter, 40 + 4: "
timeout 300 $R $V/g16.sparsec --weights /tmp/ck/gpt2 --device cuda --bench-decode --prompt-len 40 --max-new-tokens 4 --positions 64 --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
for t in memcheck racecheck synccheck; do
  echo -n "g16 $t: "; timeout 100 compute-sanitizer --tool $t $R $V/g16.sparsec --weights /tmp/ck/gpt2 --device cuda --bench-decode --prompt-len 12 --max-new-tokens 3 --positions 32 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | head -1; echo
done
bench() { # artifact prompt new positions mode round
  local flag=""; [ $5 = off ] && flag=--no-dependent-launch
  $R $V/$1.sparsec --weights $(ck $1) --device cuda --bench-decode --prompt-len $2 --max-new-tokens $3 --positions $4 --session-seq 1024 --repeat 5 $flag --json > $J/$1-p$2-$5-$6.json 2>$J/$1-p$2-$5-$6.err
  python3 -c "import json;b=json.load(open('$J/$1-p$2-$5-$6.json'))['bench'];print('$1 prompt $2 $5 r$6:', round(b['decode_tokens_per_s'],1), 'tok/s; prefill', round(1e3*b['timing']['prefill_s'],3), 'ms; dependent kernels', b.get('dependent_kernels'))" || tail -2 $J/$1-p$2-$5-$6.err
}
echo "== decode after 128 tokens (128 new) and prefill of 512 (32 new), on/off alternated, two rounds, medians of 5"
for r in 1 2; do for m in on off; do
  for a in g16 l16 g90; do bench $a 128 128 300 $m $r; done
  for a in g16 l16 g16h; do bench $a 512 32 600 $m $r; done
done; done
python3 - <<'PY'
import json
for a, p in [('g16',128),('l16',128),('g90',128),('g16',512),('l16',512),('g16h',512)]:
    if True:
        x=json.load(open(f'/tmp/res/{a}-p{p}-on-1.json'))['bench']['ids']; y=json.load(open(f'/tmp/res/{a}-p{p}-off-1.json'))['bench']['ids']
        print(a, p, 'on ids equal off ids for the first', next((i for i,(u,v) in enumerate(zip(x,y)) if u!=v), len(x)), 'of', len(x))
PY
if [ -z "${SKIP_TORCH:-}" ]; then
echo "== PyTorch on the same weights"
python3 -c "import json;json.dump(json.load(open('$J/g16-p128-on-1.json'))['bench']['prompt_ids'],open('/tmp/ck/gpt2-ids.json','w'))"
python3 -c "import json;json.dump(json.load(open('$J/l16-p128-on-1.json'))['bench']['prompt_ids'],open('/tmp/ck/llama-ids.json','w'))"
timeout 240 python3 $V/gpu_compare.py torch /tmp/ck/gpt2 --prompt-ids /tmp/ck/gpt2-ids.json --new-tokens 128 --dtype float16 --repeat 5 > $J/gpt2-torch.json 2>$J/gpt2-torch.err; echo "torch gpt2 exit $?"
timeout 240 python3 $V/gpu_compare.py torch /tmp/ck/llama --prompt-ids /tmp/ck/llama-ids.json --new-tokens 128 --dtype bfloat16 --repeat 5 > $J/llama-torch.json 2>$J/llama-torch.err; echo "torch llama exit $?"
timeout 240 python3 $V/gpu_compare.py torch-prefill /tmp/ck/gpt2 --dtype float16 --lengths 512 > $J/gpt2-torch-prefill.json 2>$J/gpt2-torch-prefill.err; echo "torch-prefill gpt2 exit $?"
timeout 240 python3 $V/gpu_compare.py torch-prefill /tmp/ck/llama --dtype bfloat16 --lengths 512 > $J/llama-torch-prefill.json 2>$J/llama-torch-prefill.err; echo "torch-prefill llama exit $?"
for f in gpt2 llama; do python3 -c "
import json
t=json.load(open('$J/$f-torch.json')); p=json.load(open('$J/$f-torch-prefill.json'))
print('torch $f decode eager', round(t.get('eager_decode_tokens_per_s',0),1), 'graph', round(t.get('graph_decode_tokens_per_s',0),1), 'tok/s; prefill 512 eager', round(p.get('eager_512_ms',0),3), 'graph', round(p.get('graph_512_ms',0),3), 'ms')" || tail -3 $J/$f-torch*.err; done
fi
tar czf $OUT/results.tar.gz -C $J .
echo done
