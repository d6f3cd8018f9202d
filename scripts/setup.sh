#!/usr/bin/env bash
# Create ./.venv and install ILVR-train with the CPU toolchain the test suite passed with (idempotent):
# CPU torch 2.13.0, and every other package at its version in scripts/constraints-cpu.txt.
#   ILVR_VENV=DIR            another venv (default .venv)
#   ILVR_CONSTRAINTS=none    the newest releases setup.py allows instead, upgraded daily (scripts/compat.sh)
# Cluster users install with `pip install -e .[cluster]` into their own CUDA environment instead (docs/install.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${ILVR_VENV:-.venv}
LOCK=${ILVR_CONSTRAINTS:-scripts/constraints-cpu.txt}
if [ "$LOCK" = none ]; then
  # torch stays the CPU build: PyPI's newer torch is a CUDA build of several GB
  LOCK="$(mktemp)"; trap 'rm -f "$LOCK"' EXIT
  echo "torch==2.13.0" > "$LOCK"
  UPGRADE=(--upgrade --upgrade-strategy eager)
  KEY="newest $(date +%F)"
else
  [ -f "$LOCK" ] || { echo "setup: ILVR_CONSTRAINTS=$LOCK does not exist" >&2; exit 2; }
  UPGRADE=()
  KEY="$(cat "$LOCK")"
fi
stamp="$VENV/.ilvr-setup-$( { cat setup.py scripts/setup.sh; echo "$KEY"; } | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
export DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "${ILVR_CONSTRAINTS:-}" = none ]; then WHICH="the newest releases setup.py allows"; else WHICH="the tested versions, $LOCK"; fi
echo "setup: installing $WHICH into $VENV (~2 minutes the first time)"
pip_install() {  # a pip config may name local package folders that are absent here: that warning is noise
  "$VENV/bin/pip" install -q "$@" 2> >(grep -v "^WARNING: Location 'file://.*is ignored" >&2)
}
# torch first, the CPU build: an unpinned torch would pull a multi-GB CUDA build
pip_install -c "$LOCK" torch==2.13.0
pip_install -c "$LOCK" "${UPGRADE[@]}" -e '.[dev]'
# DeepSpeed compiles its CPU shared-memory communication op at the first distributed start of a new venv:
# minutes of silence in the middle of the first run. Done here instead, once per venv (as DeepSpeed does it).
echo "setup: building DeepSpeed's CPU communication op once for this venv (1-9 minutes on 2 cores)"
DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$PWD/$VENV/torch_extensions" "$VENV/bin/python" - <<'PYEOF'
import deepspeed.ops
from deepspeed.accelerator import get_accelerator

builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
    builder.load(verbose=False)
PYEOF
rm -f "$VENV"/.ilvr-setup-*
touch "$stamp"
echo "setup: $VENV ready ($(DS_ACCELERATOR=cpu "$VENV/bin/python" -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)' 2>/dev/null))"
