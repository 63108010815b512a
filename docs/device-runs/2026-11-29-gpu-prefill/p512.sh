#!/usr/bin/env bash
# Prefill of 512 tokens (issue 16's target): sparsec (new) against the HF
# model's eager forward (cuBLAS matmuls) on the same weights, and decode's
# weight bandwidth. Run after run.sh's artifacts (same folder).
set -u
D=${D:-.device/v12}; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
N=$D/new; R=$N/sparsec-run
for f in gpt2 llama; do python3 $D/gpu_compare.py make /tmp/ck/$f --family $f > /dev/null || exit 1; done
for a in gpt2-f16 llama-bf16; do python3 $D/gpu_compare.py pack /tmp/ck/${a%%-*} $N/$a.sparsec > /dev/null || exit 1; done
for r in 1 2 3; do for a in gpt2-f16 llama-bf16; do
  $R $N/$a.sparsec --trust --device cuda --bench-decode --prompt-len 512 --max-new-tokens 128 --repeat 5 --positions 1024 --session-seq 1024 --json > $J/p512-$a-$r.json
  python3 -c "import json;b=json.load(open('$J/p512-$a-$r.json'))['bench'];print('$a prompt 512 round $r: prefill', round(1e3*b['timing']['prefill_s'],2), 'ms; decode', round(b['decode_tokens_per_s'],1), 'tok/s')"
done; done
cat > /tmp/ck/prefill.py <<'PY'
import json, sys, time, torch
from transformers import AutoModelForCausalLM
hf, dtype = sys.argv[1], getattr(torch, sys.argv[2])
m = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=dtype).cuda().eval()
out = {}
ids = torch.randint(0, m.config.vocab_size, (1, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
with torch.no_grad():
    for _ in range(3): m(ids, use_cache=True)
    ts = []
    for _ in range(7):
        torch.cuda.synchronize(); t = time.perf_counter(); m(ids, use_cache=True); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    ts.sort(); out["eager_prefill_512_ms"] = 1e3 * ts[3]
    # The same forward as one CUDA graph (launch overhead gone): the matmuls' own time.
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): m(ids, use_cache=False)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g): o = m(ids, use_cache=False)
    ts = []
    for _ in range(7):
        torch.cuda.synchronize(); t = time.perf_counter(); g.replay(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    ts.sort(); out["graph_prefill_512_ms"] = 1e3 * ts[3]
print(json.dumps(out))
PY
for x in gpt2:float16 llama:bfloat16; do IFS=: read f t <<< "$x"; timeout 150 python3 /tmp/ck/prefill.py /tmp/ck/$f $t > $J/$f-torch-p512.json 2>$J/$f-torch-p512.err; echo "torch $f: $(cat $J/$f-torch-p512.json) $(tail -1 $J/$f-torch-p512.err)"; done
tar czf $OUT/p512.tar.gz -C $J .
