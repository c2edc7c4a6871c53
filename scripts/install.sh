#!/usr/bin/env bash
# Installs megatron_ts and its dependencies into the current Python environment.
#   scripts/install.sh          library + CLIs
#   scripts/install.sh dev      + test tools (pytest, ruff, moto S3 server)
# On a machine without an NVIDIA GPU and without torch, torch 2.13.0 is installed first: pip
# would otherwise resolve the range in setup.py to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extra=${1:-}

if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        "$PY" -m pip install "torch>=2.4,<2.15"
    else
        "$PY" -m pip install "torch==2.13.0"
    fi
fi
if [ "$extra" = "dev" ]; then
    "$PY" -m pip install -e ".[dev]"
else
    "$PY" -m pip install -e .
fi
# DeepSpeed is a source distribution; its CPU accelerator needs this set where there is no GPU.
"$PY" - <<'PY'
import torch
print(f"megatron_ts installed; torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
PY
