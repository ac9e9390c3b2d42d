#!/usr/bin/env bash
# One-time set-up on a fresh machine: PyTorch/torchvision and the Python requirements.
# torch/torchvision are pinned to the releases this project is tested with; a machine that already has a
# torch >= 2.1 keeps it (requirements.txt asks for a range, never for a newer release).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
    "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
"$PY" -m pip install -q -r requirements.txt
"$PY" -c "import torch, torchvision, numpy, pandas, matplotlib, scipy, PIL; print(f'set-up ok: torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA available: {torch.cuda.is_available()}')"
