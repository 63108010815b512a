#!/usr/bin/env bash
# Device run, second call (the first timed out in racecheck) (issue 16): decode attention split across blocks (flash-decoding
# with a ticket counter: the last of a head's split blocks combines them).
# base/: artifacts compiled before the change; new/: after. One sparsec-run
# (the runtime did not change). GPT-2 124M f16 (g16) and a SmolLM2-shaped
# Llama bf16 (l16), checkpoints made here with torch (seed 0), packed at load.
set -u
D=${D:-.device/v18}; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
R=$D/sparsec-run
python3 $D/gpu_compare.py make /tmp/ck/gpt2 --family gpt2 > /dev/null || exit 1
python3 $D/gpu_compare.py make /tmp/ck/llama --family llama > /dev/null || exit 1
ck() { case $1 in g16) echo /tmp/ck/gpt2;; l16) echo /tmp/ck/llama;; esac; }
echo "== decode and prefill, base and new alternated"
bench() { # version model prompt new positions tag
  $R $D/$1/$2.sparsec --weights $(ck $2) --device cuda --bench-decode --prompt-len $3 --max-new-tokens $4 --positions $5 --session-seq 512 --repeat 3 --json > $J/$1-$2-$6.json 2>$J/$1-$2-$6.err
  python3 -c "import json;b=json.load(open('$J/$1-$2-$6.json'))['bench'];print('$1 $2 prompt $3:', round(b['decode_tokens_per_s'],1), 'tok/s; prefill', round(1e3*b['timing']['prefill_s'],2), 'ms')"
}
for r in 1; do for v in base new; do
  bench $v g16 128 128 512 p128-$r; bench $v g16 896 120 1024 p896-$r; bench $v g16 512 1 520 p512-$r
  bench $v l16 128 128 512 p128-$r; bench $v l16 2000 64 2100 p2000-$r; bench $v l16 4000 64 4100 p4000-$r; bench $v l16 512 1 520 p512-$r
done; done
echo timing-done; echo "== new: racecheck, synccheck (300-token prompt: 2 splits; 1 step)"
for t in racecheck synccheck; do echo -n "l16 $t: "; timeout 100 compute-sanitizer --tool $t $R $D/new/l16.sparsec --weights /tmp/ck/llama --device cuda --bench-decode --prompt-len 300 --max-new-tokens 1 --positions 320 --session-seq 512 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | head -1; echo; done
tar czf $OUT/results.tar.gz -C $J .
echo done
