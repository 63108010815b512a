#!/bin/bash
# Device check of 2026-11-29 (session 7): keys cached before RoPE
# (#kv(pre_rope)) on the NVPTX attention kernel, against the CPU kernel and
# the reference interpreter, on artifacts compiled on the dev box (--target all).
cd "$(dirname "$0")"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for s in 1 64 300 1000; do echo "== attn_pre (9/3 heads, d 64, rank 32, adjacent) seq $s"; ./sparsec-run attn_pre --device cuda --compare-cpu --check --seq $s --trust 2>&1 | grep -iE "pass|fail|mismatch|error"; done
for s in 1 17; do echo "== pre_half (d 8, rank 6, halves) seq $s"; ./sparsec-run pre_half --device cuda --compare-cpu --check --seq $s --trust 2>&1 | grep -iE "pass|fail|mismatch|error"; done
echo "== tiny Llama, DCT keep 0.5 before RoPE: prefill 40 + 16 decode steps"
./sparsec-run tiny_pre --device cuda --bench-decode --prompt-len 40 --max-new-tokens 16 --check --compare-cpu --positions 64 --trust 2>&1 | grep -iE "pass|fail|mismatch|error"
echo "== memcheck attn_pre seq 64"; compute-sanitizer --tool memcheck ./sparsec-run attn_pre --device cuda --seq 64 --trust 2>&1 | tail -2
echo "== memcheck tiny_pre decode"; compute-sanitizer --tool memcheck ./sparsec-run tiny_pre --device cuda --bench-decode --prompt-len 20 --max-new-tokens 4 --positions 64 --trust 2>&1 | tail -2
