"""`python -m ilvr.evaluate ...` = `ilvr-eval ...` (see ilvr.evaluation.cli)."""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file (e.g. by a launcher): make `ilvr` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ilvr.evaluation.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
