#!/usr/bin/env bash
# Create ./.venv and install ILVR-train with its pinned CPU toolchain (idempotent).
# Cluster users install with `pip install -e .[flash]` into their own CUDA environment instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${ILVR_VENV:-.venv}
stamp="$VENV/.ilvr-setup-$(cat setup.py scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
export DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1
# Pin the CPU build first: an unpinned torch would pull a multi-GB CUDA build.
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e '.[dev]'
rm -f "$VENV"/.ilvr-setup-*
touch "$stamp"
echo "setup: $VENV ready ($("$VENV/bin/python" -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)'))"
