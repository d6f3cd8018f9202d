#!/usr/bin/env bash
# Run the test suite (installs the environment first if needed). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${ILVR_VENV:-.venv}
export DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$PWD/$VENV/torch_extensions" TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" -m pytest "$@"
