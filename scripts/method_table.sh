#!/usr/bin/env bash
# The method table (docs/method.md): every ILVR variant trained, exported and evaluated on 2 CPU ranks.
#   bash scripts/method_table.sh            # the full table (about 90 minutes on 2 cores)
#   bash scripts/method_table.sh --quick    # the CI size (minutes): checks that everything runs
# Other options: python scripts/method_table.py --help
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${ILVR_VENV:-.venv}
export DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$PWD/$VENV/torch_extensions" TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" scripts/method_table.py "$@"
