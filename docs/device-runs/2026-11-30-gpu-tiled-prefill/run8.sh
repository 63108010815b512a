#!/usr/bin/env bash
# Eighth call: new6 = new3 with the activation split's low part left unrounded
# (the MMA truncates it: 3 instructions per value instead of 5) and the tiled
# matmul's hi and lo products in two accumulators (two MMA chains). Checks,
# new3 against new6, and PyTorch's prefill in the same call.
set -u
D=${D:-.device/v20}; J=/tmp/res8; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
R=$D/new3/sparsec-run; N=$D/new6
echo "== new6 kernels vs the interpreter and the CPU"
for a in tiled wide2 mma; do for s in 2 17 37 65 128 300; do
  echo -n "$a seq $s: "; $R $N/$a.sparsec --device cuda --seq $s --check --compare-cpu 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo
done; done
for s in 2 37 300; do echo -n "attn seq $s: "; $R $N/attn.sparsec --device cuda --seq $s --check --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo; done
B="--device cuda --bench-decode --prompt-len 20 --max-new-tokens 12 --prefill-rows 7 --session-seq 32 --positions 32"
for m in gpt2_tiny-f16 llama_tiny-bf16; do echo "== $m"; $R $N/$m.sparsec $B --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1; $R $N/$m.sparsec $B --compare-cpu 2>&1 | tail -1; done
python3 $D/gpu_compare.py make /tmp/ck/gpt2 --family gpt2 > /dev/null || exit 1
python3 $D/gpu_compare.py make /tmp/ck/llama --family llama > /dev/null || exit 1
ck() { case $1 in g16) echo /tmp/ck/gpt2;; l16) echo /tmp/ck/llama;; esac; }
for a in g16 l16; do echo -n "new6 $a 300 in calls of 100 +8 vs CPU: "; $R $N/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1; done
for a in g16 l16; do echo -n "new6 $a 130 in calls of 45 +3 vs interpreter: "; timeout 200 $R $N/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 130 --max-new-tokens 3 --prefill-rows 45 --positions 256 --session-seq 256 --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1; done
for t in memcheck racecheck; do echo -n "new6 tiled seq 37 $t: "; timeout 60 compute-sanitizer --tool $t $R $N/tiled.sparsec --device cuda --seq 37 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | head -1; echo; done
bench() { # version model prompt new positions tag
  $R $D/$1/$2.sparsec --weights $(ck $2) --device cuda --bench-decode --prompt-len $3 --max-new-tokens $4 --positions $5 --session-seq 1024 --repeat 5 --json > $J/$1-$2-$6.json 2>$J/$1-$2-$6.err
  python3 -c "import json;b=json.load(open('$J/$1-$2-$6.json'))['bench'];print('$1 $2 prompt $3:', round(b['decode_tokens_per_s'],1), 'tok/s; prefill', round(1e3*b['timing']['prefill_s'],2), 'ms')" || tail -2 $J/$1-$2-$6.err
}
for r in 1 2; do for v in new3 new6; do for a in g16 l16; do
  bench $v $a 128 64 200 p128-$r; bench $v $a 512 64 600 p512-$r; bench $v $a 960 32 1000 p960-$r
done; done; done
python3 - <<'PY'
import json
for a in ['g16','l16']:
    for p in [128, 512, 960]:
        m=json.load(open(f'/tmp/res8/new3-{a}-p{p}-1.json'))['bench']['ids']; n=json.load(open(f'/tmp/res8/new6-{a}-p{p}-1.json'))['bench']['ids']
        print(a, p, 'new6 ids equal new3 ids for the first', next((i for i,(x,y) in enumerate(zip(m,n)) if x!=y), len(m)), 'of', len(m))
PY
cat > /tmp/ck/prefill.py <<'PY'
import json, sys, time, torch
from transformers import AutoModelForCausalLM
hf, dtype = sys.argv[1], getattr(torch, sys.argv[2])
m = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=dtype).cuda().eval()
out = {}
for n in [128, 512, 960]:
    ids = torch.randint(0, m.config.vocab_size, (1, n), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        for _ in range(3): m(ids, use_cache=True)
        ts = []
        for _ in range(7):
            torch.cuda.synchronize(); t = time.perf_counter(); m(ids, use_cache=True); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
        ts.sort(); out[f"eager_{n}_ms"] = 1e3 * ts[3]
        s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3): m(ids, use_cache=False)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g): o = m(ids, use_cache=False)
        ts = []
        for _ in range(7):
            torch.cuda.synchronize(); t = time.perf_counter(); g.replay(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
        ts.sort(); out[f"graph_{n}_ms"] = 1e3 * ts[3]
print(json.dumps(out))
PY
for x in gpt2:float16 llama:bfloat16; do IFS=: read f t <<< "$x"; timeout 200 python3 /tmp/ck/prefill.py /tmp/ck/$f $t > $J/$f-torch.json 2>$J/$f-torch.err; echo "torch $f: $(cat $J/$f-torch.json)"; done
tar czf $OUT/results8.tar.gz -C $J .
echo done
