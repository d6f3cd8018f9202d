"""slurm/train.sh's defaults without a cluster: ILVR_CONFIG is required (no silent tiny CPU recipe on a GPU
cluster), and the Python is the active python3 unless ILVR_PYTHON names one (never the quick start's .venv)."""
from __future__ import annotations

import os
import subprocess

from tests.conftest import REPO


def run_script(**env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ILVR_", "SLURM_"))}
    return subprocess.run(["bash", str(REPO / "slurm" / "train.sh")], cwd=REPO, env={**base, **env},
                          capture_output=True, text=True, timeout=60)


def test_train_sh_requires_ilvr_config():
    proc = run_script(SLURM_JOB_ID="1")
    assert proc.returncode == 2
    assert "ILVR_CONFIG is not set" in proc.stderr and "configs/qwen25vl_7b_vsp.yaml" in proc.stderr


def test_train_sh_uses_the_active_python3_unless_ilvr_python_is_set(tmp_path):
    script = (REPO / "slurm" / "train.sh").read_text()
    assert ".venv" not in script.split("# ----------------------------------------------------------------"
                                       " what to train")[0]
    fake = tmp_path / "bin"
    fake.mkdir()
    marker = tmp_path / "called"
    (fake / "python3").write_text(f"#!/bin/sh\necho \"$@\" > {marker}\nexit 7\n")  # the config check fails
    (fake / "python3").chmod(0o755)
    path = f"{fake}:{os.environ['PATH']}"
    proc = run_script(SLURM_JOB_ID="1", ILVR_CONFIG="configs/tiny_cpu.yaml", PATH=path)
    assert proc.returncode == 2 and marker.is_file(), proc.stderr  # the active python3 ran the config check
    marker.unlink()
    proc = run_script(SLURM_JOB_ID="1", ILVR_CONFIG="configs/tiny_cpu.yaml", PATH=path, ILVR_PYTHON="/bin/false")
    assert proc.returncode == 2 and not marker.exists(), proc.stderr
