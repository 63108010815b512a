#!/usr/bin/env bash
# Device run (issue 16, twenty-fifth session): sparse matmuls a warp per
# output element for every format (sparse_warp.rs). Checks of small graphs
# against the interpreter and the CPU, sanitizers, then GPT-2 124M with
# sparse attention/MLP matrices (weights made here by torch, pruned and
# packed at load): session checks, and decode/prefill of the new kernels
# against the thread-per-output ones (`-old`) and the dense f16 model.
set -u
V=.device/v41; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
R=$V/sparsec-run
echo "== small graphs: cuda vs the interpreter and the CPU"
for a in $V/ft-*.sparsec; do for s in 1 5 37; do
  echo -n "$(basename $a) seq $s: "; $R $a --device cuda --seq $s --check --compare-cpu 2>&1 | grep -E "reference|cpu|CPU|rror|MISMATCH" | tr '\n' ' '; echo
done; done
for a in ft-extra ft-nm-q ft-bsr; do
  echo -n "$a memcheck: "; compute-sanitizer --tool memcheck $R $V/$a.sparsec --device cuda --seq 37 2>&1 | grep "ERROR SUMMARY"
  echo -n "$a racecheck: "; compute-sanitizer --tool racecheck $R $V/$a.sparsec --device cuda --seq 5 2>&1 | grep "RACECHECK SUMMARY"
done
python3 $V/gpu_compare.py make /tmp/ck/gpt2 --family gpt2 > /dev/null || exit 1
echo "== GPT-2 124M sparse models: session vs the CPU (20-token prompt in calls of 7, + 8)"
for m in nm24 nm24q4 bsr bsrq8 u50q4 u90q8; do
  echo -n "$m: "; $R $V/$m.sparsec --weights /tmp/ck/gpt2 --device cuda --bench-decode --prompt-len 20 --max-new-tokens 8 --prefill-rows 7 --positions 64 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
done
for m in nm24q4 u50q4; do
  echo -n "$m vs the interpreter: "; $R $V/$m.sparsec --weights /tmp/ck/gpt2 --device cuda --bench-decode --prompt-len 20 --max-new-tokens 8 --prefill-rows 7 --positions 64 --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
done
echo -n "nm24q4 memcheck: "; compute-sanitizer --tool memcheck $R $V/nm24q4.sparsec --weights /tmp/ck/gpt2 --device cuda --bench-decode --prompt-len 10 --max-new-tokens 3 --positions 32 2>&1 | grep "ERROR SUMMARY"
bench() { # artifact prompt round
  $R $V/$1.sparsec --weights /tmp/ck/gpt2 --trust --device cuda --bench-decode --prompt-len $2 --max-new-tokens 128 --repeat 5 --positions 1024 --json > $J/$1-p$2-$3.json 2>$J/$1-p$2-$3.err
  python3 -c "import json;b=json.load(open('$J/$1-p$2-$3.json'))['bench'];print('$1 p$2 r$3: decode', round(b['decode_tokens_per_s'],1), 'tok/s; prefill', round(1e3*b['timing']['prefill_s'],3), 'ms')" || tail -2 $J/$1-p$2-$3.err
}
echo "== decode after 128 and prefill of 128 / 512, medians of 5, alternated"
for r in 1 2; do for m in dense nm24 nm24-old nm24q4 nm24q4-old bsr bsr-old bsrq8 bsrq8-old u50q4 u50q4-old u90q8 u90q8-old; do bench $m 128 $r; done; done
for m in dense nm24 nm24-old nm24q4 nm24q4-old bsr bsr-old u50q4 u50q4-old u90q8 u90q8-old; do bench $m 512 1; done
tar czf $OUT/results.tar.gz -C $J .
echo done
