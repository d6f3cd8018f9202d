"""The tested set (scripts/constraints-cpu.txt) against setup.py's ranges and the running venv.

A new dependency without a pin would again be whatever the registry published that morning; a pin outside
its range would make scripts/setup.sh fail to resolve.
"""
from __future__ import annotations

import ast
import importlib.metadata as metadata
import os

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO

LOCK = REPO / "scripts" / "constraints-cpu.txt"


def setup_requirements() -> list[Requirement]:
    """install_requires + the dev extra of setup.py, read without running it."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    return [Requirement(r) for r in kw["install_requires"] + kw["extras_require"]["dev"]]


def pins() -> dict[str, str]:
    out = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            out[canonicalize_name(name)] = version
    return out


def test_every_requirement_is_pinned_within_its_range():
    locked = pins()
    for req in setup_requirements():
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} (setup.py) has no pin in {LOCK.name}: run scripts/compat.sh --full --write-lock"
        assert req.specifier.contains(locked[name], prereleases=True), \
            f"{LOCK.name} pins {req.name}=={locked[name]}, outside setup.py's {req.specifier}"
    assert locked["torch"] == "2.13.0"  # the CPU build on this machine kind; anything else pulls a CUDA build


def test_setup_installs_with_the_lock():
    script = (REPO / "scripts" / "setup.sh").read_text(encoding="utf-8")
    assert "scripts/constraints-cpu.txt" in script and script.count('-c "$LOCK"') == 2


def test_the_running_venv_is_the_tested_set():
    import sys

    if os.path.realpath(sys.prefix) != os.path.realpath(REPO / ".venv"):
        pytest.skip(f"not the project's .venv ({sys.prefix}): e.g. scripts/compat.sh's newest releases")
    locked = pins()
    wrong = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        version = dist.version.split("+")[0] if name == "torch" else dist.version
        if name in locked and locked[name] != version:
            wrong[name] = (locked[name], version)
    assert not wrong, f"installed versions differ from {LOCK.name} (pinned, installed): {wrong}; run scripts/setup.sh"
