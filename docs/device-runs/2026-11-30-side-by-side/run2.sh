#!/usr/bin/env bash
# Second call: 16-row tiles in the shared-memory tiled matmul (half the
# threads copy the activations), for every output narrower than 1024
# (`n`, SPARSEC_TILE16=narrow at compile time) or only where k >= 2048 (`d`,
# =deep), against the 32-row tiles (v34's artifacts). Checks, then prefill
# of 512 and 128 rows alternated in three rounds.
set -u
V=.device/v35; J=/tmp/res2; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
R=$V/sparsec-run
for f in gpt2 llama; do python3 $V/gpu_compare.py make /tmp/ck/$f --family $f > /dev/null || exit 1; done
ck() { case $1 in g*) echo /tmp/ck/gpt2;; l*) echo /tmp/ck/llama;; esac; }
for s in 2 17 37 300 513; do echo -n "mth16 seq $s (1e-4): "; $R $V/mth16.sparsec --device cuda --seq $s --check --compare-cpu --atol 1e-4 --rtol 1e-4 2>&1 | grep -E "check_reference|check_cpu|rror" | tr '\n' ' '; echo; done
for t in memcheck racecheck synccheck; do echo -n "mth16 seq 37 $t: "; timeout 90 compute-sanitizer --tool $t $R $V/mth16.sparsec --device cuda --seq 37 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | head -1; echo; done
for a in g16n g16hn l16n; do
  echo -n "$a vs CPU, 300-token prompt in calls of 100 + 8: "
  $R $V/$a.sparsec --weights $(ck $a) --device cuda --bench-decode --prompt-len 300 --max-new-tokens 8 --prefill-rows 100 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
done
bench() { # artifact prompt round
  $R $V/$1.sparsec --weights $(ck $1) --device cuda --bench-decode --prompt-len $2 --max-new-tokens 4 --positions 600 --session-seq 1024 --repeat 5 --json > $J/$1-p$2-$3.json 2>$J/$1-p$2-$3.err
  python3 -c "import json;b=json.load(open('$J/$1-p$2-$3.json'))['bench'];print('$1 prompt $2 r$3: prefill', round(1e3*b['timing']['prefill_s'],3), 'ms')" || tail -2 $J/$1-p$2-$3.err
}
for r in 1 2 3; do for p in 512 128; do for a in g16 g16n g16d g16h g16hn g16hd l16 l16n l16d; do bench $a $p $r; done; done; done
tar czf $OUT/results2.tar.gz -C $J .
echo done
