set -u
D=.device; R=$D/sparsec-run
mkdir -p /tmp/ck
python3 $D/gpu_compare.py make /tmp/ck/llama --family llama > /dev/null || exit 1
for m in llama_nsa llama_nsa16; do python3 $D/gpu_compare.py pack /tmp/ck/llama $D/art/$m.sparsec > /dev/null || exit 1; done
for cfg in "llama_nsa16 4000" "llama_nsa16 6000" "llama_nsa 6000"; do
  set -- $cfg
  echo "== $1 prompt $2"
  $R $D/art/$1.sparsec --trust --device cuda --bench-decode --prompt-len $2 --max-new-tokens 4 --prefill-rows 512 --positions 6100 --compare-cpu --atol 1e-3 --rtol 1e-3 2>&1 | grep -v "^$" | tail -14
done
