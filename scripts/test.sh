#!/usr/bin/env bash
# Run the test suite (installs the environment first if needed). Extra args go to pytest.
# Two pytest-xdist workers, one test file per unit of work (tests/conftest.py); ILVR_TEST_WORKERS=0 runs serially.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${ILVR_VENV:-.venv}
export DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$PWD/$VENV/torch_extensions" TOKENIZERS_PARALLELISM=false
# more busy processes than cores (two workers, each starting ranks): OpenMP threads that wait sleep instead of
# spinning on a core another process needs (a 2 s encode test took 60 s with spinning threads beside a training)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec "$VENV/bin/python" -m pytest -n "${ILVR_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
