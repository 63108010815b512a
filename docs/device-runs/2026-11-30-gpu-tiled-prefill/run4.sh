#!/usr/bin/env bash
# Fourth call: prefill attention on tensor cores (attention_mma: a warp per
# 16 query rows and head, flash-style over tiles of 32 keys, TF32 MMAs).
# new = tiled matmuls + tail fix (run3), new2 = new + the attention kernel.
set -u
D=${D:-.device/v20}; J=/tmp/res4; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
R=$D/new2/sparsec-run; N=$D/new2
echo "== attention_mma vs the interpreter and the CPU (one call of seq rows from position 0)"
for s in 2 5 16 17 37 64 100 300; do
  echo -n "attn seq $s: "; $R $N/attn.sparsec --device cuda --seq $s --check --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo
done
python3 $D/gpu_compare.py make /tmp/ck/gpt2 --family gpt2 > /dev/null || exit 1
python3 $D/gpu_compare.py make /tmp/ck/llama --family llama > /dev/null || exit 1
ck() { case $1 in g16) echo /tmp/ck/gpt2;; l16) echo /tmp/ck/llama;; esac; }
echo "== new2: 124M models, CUDA session vs the CPU session, and vs the interpreter"
for a in g16 l16; do echo -n "$a 300 in calls of 100 +8: "; $R $N/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1; done
for a in g16 l16; do echo -n "$a 130 in calls of 45 +3 --check: "; timeout 200 $R $N/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 130 --max-new-tokens 3 --prefill-rows 45 --positions 256 --session-seq 256 --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1; done
echo "== sanitizers"
for t in memcheck racecheck; do echo -n "attn seq 37 $t: "; timeout 60 compute-sanitizer --tool $t $R $N/attn.sparsec --device cuda --seq 37 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | head -1; echo; done
echo -n "g16 memcheck 100 + 2: "; timeout 120 compute-sanitizer --tool memcheck $R $N/g16.sparsec --weights /tmp/ck/gpt2 --device cuda --bench-decode --prompt-len 100 --max-new-tokens 2 --positions 128 --session-seq 64 2>&1 | grep -E "ERROR SUMMARY" | head -1; echo
echo "== prefill and decode, new and new2 alternated"
bench() { # version model prompt new positions tag
  $D/$1/sparsec-run $D/$1/$2.sparsec --weights $(ck $2) --device cuda --bench-decode --prompt-len $3 --max-new-tokens $4 --positions $5 --session-seq 1024 --repeat 5 --json > $J/$1-$2-$6.json 2>$J/$1-$2-$6.err
  python3 -c "import json;b=json.load(open('$J/$1-$2-$6.json'))['bench'];print('$1 $2 prompt $3:', round(b['decode_tokens_per_s'],1), 'tok/s; prefill', round(1e3*b['timing']['prefill_s'],2), 'ms')" || tail -2 $J/$1-$2-$6.err
}
for r in 1 2; do for v in new new2; do for a in g16 l16; do
  bench $v $a 128 64 200 p128-$r; bench $v $a 512 64 600 p512-$r; bench $v $a 960 32 1000 p960-$r
done; done; done
python3 - <<'PY'
import json
for a in ['g16','l16']:
    for p in [128, 512, 960]:
        m=json.load(open(f'/tmp/res4/new-{a}-p{p}-1.json'))['bench']['ids']; n=json.load(open(f'/tmp/res4/new2-{a}-p{p}-1.json'))['bench']['ids']
        print(a, p, 'new2 ids equal new ids for the first', next((i for i,(x,y) in enumerate(zip(m,n)) if x!=y), len(m)), 'of', len(m))
PY
for a in g16 l16; do
  timeout 200 ncu --csv --metrics gpu__time_duration.sum --launch-count $(case $a in g16) echo 126;; l16) echo 423;; esac) $R $N/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 512 --max-new-tokens 1 --positions 520 --session-seq 512 > $J/ncu-new2-$a.csv 2>/dev/null
  python3 - $J/ncu-new2-$a.csv $a <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]; ki = h.index('Kernel Name'); vi = h.index('Metric Value'); gi = h.index('Grid Size')
t = collections.defaultdict(lambda: [0.0, 0, ''])
for r in rows[1:]:
    e = t[r[ki].split('(')[0]]; e[0] += float(r[vi].replace(',', '')) / 1e3; e[1] += 1; e[2] = r[gi]
print(f'== ncu new2 {sys.argv[2]}: {sum(e[1] for e in t.values())} launches, {sum(e[0] for e in t.values())/1e3:.3f} ms of kernel time')
for k, (us, n, g) in sorted(t.items(), key=lambda x: -x[1][0]):
    print(f'  {k:<24} {n:4d} launches {us/1e3:8.3f} ms {us/n:9.1f} us each  grid {g}')
PY
done
cat > /tmp/ck/prefill.py <<'PY'
import json, sys, time, torch
from transformers import AutoModelForCausalLM
hf, dtype, n = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3])
m = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=dtype).cuda().eval()
out = {}
ids = torch.randint(0, m.config.vocab_size, (1, n), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
with torch.no_grad():
    for _ in range(3): m(ids, use_cache=True)
    ts = []
    for _ in range(7):
        torch.cuda.synchronize(); t = time.perf_counter(); m(ids, use_cache=True); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    ts.sort(); out["eager_ms"] = 1e3 * ts[3]
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): m(ids, use_cache=False)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g): o = m(ids, use_cache=False)
    ts = []
    for _ in range(7):
        torch.cuda.synchronize(); t = time.perf_counter(); g.replay(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    ts.sort(); out["graph_ms"] = 1e3 * ts[3]
print(json.dumps(out))
PY
for x in gpt2:float16 llama:bfloat16; do IFS=: read f t <<< "$x"; for n in 128 512; do timeout 150 python3 /tmp/ck/prefill.py /tmp/ck/$f $t $n > $J/$f-torch-$n.json 2>$J/$f-torch-$n.err; echo "torch $f prefill $n: $(cat $J/$f-torch-$n.json) $(tail -1 $J/$f-torch-$n.err | cut -c1-200)"; done; done
tar czf $OUT/results4.tar.gz -C $J .
echo done
