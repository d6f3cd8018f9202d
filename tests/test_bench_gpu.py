"""bench/gpu.sh cannot rot: its --smoke mode runs the same code (bench/gpu.py, bench/inference.py) on a tiny
model on the CPU and writes both JSON files with every measured row."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_gpu_script_smoke(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--smoke"], env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    train = json.loads((tmp_path / "train_smoke.json").read_text())
    kinds = {(r["kind"], r["batch"]) for r in train["rows"] if "error" not in r}
    assert kinds == {(k, b) for k in ("stage1_padded", "stage1_packed", "stage2", "stage2_ckpt") for b in (1, 2)}
    assert all(r["tokens_per_s"] > 0 for r in train["rows"])
    inference = json.loads((tmp_path / "inference_smoke.json").read_text())
    assert inference["throughput"] and inference["sweep"]
