#!/usr/bin/env bash
# Device run (issue 16): prefill matmuls on tensor cores (mma.sync m16n8k8,
# TF32 with activations split hi + lo) for f16/bf16 weights, seq > 1.
# mid = 7898e8f (greedy steps on the device, warp GEMV for every call);
# new = mid + the tensor-core path.
set -u
D=${D:-.device/v10}; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
N=$D/new; R=$N/sparsec-run
echo "== tensor-core kernels vs the interpreter and the CPU"
for a in mma wide2; do for s in 1 2 5 16 17 37 128; do
  echo -n "$a seq $s: "; $R $N/$a.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo
done; done
B="--device cuda --bench-decode --prompt-len 20 --max-new-tokens 12 --prefill-rows 7 --session-seq 32 --positions 64"
for m in gpt2_tiny-f16 llama_tiny-f16 llama_tiny-bf16; do
  A=$N/$m.sparsec; echo "== $m"
  $R $A $B --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
  $R $A $B --compare-cpu 2>&1 | tail -1
  $R $A --device cuda --seq 30 --check --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -2
  $R $A --device cuda --bench-decode --prompt-len 20 --max-new-tokens 16 --positions 64 --json > $J/$m-g.json
  python3 -c "import json;a=json.load(open('$J/$m-g.json'))['bench'];print('device greedy = host argmax:',a['host_argmax_ids_equal'])"
done
echo "== compute-sanitizer (prefill of 20 in calls of 7 through the tensor-core path)"
for m in gpt2_tiny-f16 llama_tiny-bf16; do for t in memcheck racecheck; do
  echo -n "$m $t: "; compute-sanitizer --tool $t $R $N/$m.sparsec --device cuda --bench-decode --prompt-len 20 --max-new-tokens 3 --prefill-rows 7 --positions 64 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | head -1
done; done
echo -n "wide2 memcheck: "; compute-sanitizer --tool memcheck $R $N/wide2.sparsec --device cuda --seq 37 2>&1 | grep -E "ERROR SUMMARY" | head -1
for f in gpt2 llama; do python3 $D/gpu_compare.py make /tmp/ck/$f --family $f > /dev/null || exit 1; done
for v in mid new; do for a in gpt2-f16 llama-bf16; do python3 $D/gpu_compare.py pack /tmp/ck/${a%%-*} $D/$v/$a.sparsec > /dev/null || exit 1; done; done
echo "== 124M models: CUDA session vs the CPU session (new; prefill rows through tensor cores)"
for a in gpt2-f16 llama-bf16; do $R $N/$a.sparsec --trust --device cuda --bench-decode --prompt-len 40 --max-new-tokens 6 --prefill-rows 17 --compare-cpu --atol 1e-3 --rtol 1e-3 2>&1 | tail -1; done
echo "== prefill (128 and 960 tokens) and decode; mid and new alternated"
for r in 1 2; do for v in mid new; do for a in gpt2-f16 llama-bf16; do for p in 128 960; do
  $D/$v/sparsec-run $D/$v/$a.sparsec --trust --device cuda --bench-decode --prompt-len $p --max-new-tokens 64 --repeat 5 --positions 1024 --session-seq 1024 --json > $J/$v-$a-$p-$r.json
  python3 -c "import json;b=json.load(open('$J/$v-$a-$p-$r.json'))['bench'];print('$v $a prompt $p round $r: prefill', round(1e3*b['timing']['prefill_s'],2), 'ms', round(b['prefill_tokens_per_s']), 'tok/s; decode', round(b['decode_tokens_per_s'],1), 'tok/s; host argmax equal:', b.get('host_argmax_ids_equal'))"
done; done; done; done
python3 - <<'PY'
import json
for a in ['gpt2-f16','llama-bf16']:
    for p in [128, 960]:
        m=json.load(open(f'/tmp/res/mid-{a}-{p}-1.json'))['bench']['ids']; n=json.load(open(f'/tmp/res/new-{a}-{p}-1.json'))['bench']['ids']
        print(a, p, 'new ids equal mid ids for the first', next((i for i,(x,y) in enumerate(zip(m,n)) if x!=y), len(m)), 'of', len(m))
PY
echo "== PyTorch prefill (same weights; HF model forward over the prompt, median of 5)"
cat > /tmp/ck/prefill.py <<'PY'
import json, sys, time, torch
from transformers import AutoModelForCausalLM
hf, dtype = sys.argv[1], getattr(torch, sys.argv[2])
m = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=dtype).cuda().eval()
out = {}
for p in (128, 960):
    ids = torch.randint(0, m.config.vocab_size, (1, p), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        for _ in range(3): m(ids, use_cache=True)
        ts = []
        for _ in range(5):
            torch.cuda.synchronize(); t = time.perf_counter(); m(ids, use_cache=True); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    ts.sort(); out[f"prefill_{p}_ms"] = 1e3 * ts[2]
print(json.dumps(out))
PY
for x in gpt2:float16 llama:bfloat16; do IFS=: read f t <<< "$x"; timeout 120 python3 /tmp/ck/prefill.py /tmp/ck/$f $t > $J/$f-torch-prefill.json 2>$J/$f-torch-prefill.err; echo "torch $f: $(cat $J/$f-torch-prefill.json)"; done
tar czf $OUT/results.tar.gz -C $J .
echo done
