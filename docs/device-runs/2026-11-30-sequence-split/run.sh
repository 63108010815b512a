#!/usr/bin/env bash
# Device run (issues 15 and 16): the sequence-axis caches after the CPU moved
# them onto attention's split variant. The NVPTX kernel (`kv_sequence.rs`) is
# the same, now given the split variant's scratch operand it does not read.
# SmolLM2-shaped Llama (bf16 weights, f16 caches; placeholder checkpoint made
# here by torch, seed 0), sequence-axis DCT (`ls16`) and PSWF (`lp16`) caches,
# keep 0.5: CUDA session vs CPU session and vs the interpreter, memcheck,
# decode after 2000 tokens. Then an ncu `--set full` profile of the GPT-2 f16
# prefill's largest matmuls (issue 16: what bounds them).
set -u
D=${D:-.device/v22}; J=/tmp/res; mkdir -p $J /tmp/ck; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
R=$D/sparsec-run
python3 $D/gpu_compare.py make /tmp/ck/llama --family llama > /dev/null || exit 1
python3 $D/gpu_compare.py make /tmp/ck/gpt2 --family gpt2 > /dev/null || exit 1
echo "== 400-token prompt in calls of 150, 40 new: against the CPU (--compare-cpu)"
for a in ls16 lp16; do
  $R $D/$a.sparsec --weights /tmp/ck/llama --device cuda --bench-decode --prompt-len 400 --max-new-tokens 40 --prefill-rows 150 --positions 512 --session-seq 512 --compare-cpu --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
done
echo "== 400-token prompt, 4 new: against the interpreter (--check)"
for a in ls16 lp16; do
  $R $D/$a.sparsec --weights /tmp/ck/llama --device cuda --bench-decode --prompt-len 400 --max-new-tokens 4 --positions 512 --session-seq 512 --check --atol 2e-3 --rtol 2e-3 2>&1 | tail -1
done
echo -n "ls16 memcheck: "; compute-sanitizer --tool memcheck $R $D/ls16.sparsec --weights /tmp/ck/llama --device cuda --bench-decode --prompt-len 340 --max-new-tokens 3 --positions 512 --session-seq 512 2>&1 | grep "ERROR SUMMARY"
echo "== decode after a 2000-token prompt, 64 new, median of 3"
for a in ls16 lp16; do
  $R $D/$a.sparsec --weights /tmp/ck/llama --device cuda --bench-decode --prompt-len 2000 --max-new-tokens 64 --repeat 3 --positions 2100 --session-seq 512 --json > $J/$a.json 2>$J/$a.err
  python3 -c "import json;b=json.load(open('$J/$a.json'))['bench'];print('$a:', round(b['decode_tokens_per_s'],1), 'tok/s; prefill 2000', round(1e3*b['timing']['prefill_s'],1), 'ms')" || tail -2 $J/$a.err
done
echo "== ncu --set full: GPT-2 f16, 512-token prefill, its matmuls"
timeout 300 ncu --set full -k regex:matmul --launch-count 5 --csv --page details $R $D/g16.sparsec --weights /tmp/ck/gpt2 --device cuda --bench-decode --prompt-len 512 --max-new-tokens 1 --positions 520 --session-seq 512 > $J/ncu-full-g16.csv 2>$J/ncu-full-g16.err
wc -l $J/ncu-full-g16.csv; tail -2 $J/ncu-full-g16.err
python3 - <<'PY'
import csv
rows = list(csv.DictReader(open('/tmp/res/ncu-full-g16.csv')))
want = ['Duration', 'Compute (SM) Throughput', 'Memory Throughput', 'DRAM Throughput', 'Achieved Occupancy', 'Registers Per Thread',
        'Block Size', 'Grid Size', 'Executed Ipc Active', 'L1/TEX Hit Rate', 'L2 Hit Rate', 'Theoretical Occupancy', 'Warp Cycles Per Issued Instruction', 'Issue Slots Busy', 'Eligible Warps Per Scheduler', 'Dynamic Shared Memory Per Block', 'Static Shared Memory Per Block']
seen = {}
for r in rows:
    k = (r.get('ID'), r.get('Kernel Name'))
    if r.get('Metric Name') in want:
        seen.setdefault(k, []).append(f"{r['Metric Name']}={r['Metric Value']}{r.get('Metric Unit','')}")
for k, v in seen.items():
    print(k[0], k[1][:40], '; '.join(v))
PY
tar czf $OUT/results.tar.gz -C $J .
echo done
