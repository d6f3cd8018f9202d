"""Which module may import which (issue 24): the imports are read with `ast`, nothing is run but the
subprocess that imports the data pipeline alone."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

from tests.conftest import REPO

PACKAGES = ("ilvr", "data_pipeline")


def _modules(*packages: str) -> list[pathlib.Path]:
    return sorted(p for package in packages for p in pathlib.Path(REPO, package).rglob("*.py"))


def _imports(path: pathlib.Path) -> list[tuple[str, str | None, int]]:
    """(module, name or None, line) of every import in the file, function-level ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.module, a.name, node.lineno) for a in node.names]
    return out


def test_no_module_imports_another_modules_private_names():
    found = [f"{p.relative_to(REPO)}:{line}: from {module} import {name}" for p in _modules(*PACKAGES)
             for module, name, line in _imports(p)
             if name and name.startswith("_") and not name.startswith("__")]
    assert not found, "make the shared name public in the module that owns it:\n" + "\n".join(found)


def test_checkpoints_do_not_import_elastic_resume():
    """Resharding is a layer on top of checkpoints: elastic.py imports checkpoint.py, never the reverse."""
    training = pathlib.Path(REPO, "ilvr", "training")
    below = [p for p in training.glob("*.py") if p.name.startswith("checkpoint")]
    assert below
    found = [f"{p.name}:{line}: {module}" for p in below for module, name, line in _imports(p)
             if module == "ilvr.training.elastic" or (module == "ilvr.training" and name == "elastic")]
    assert not found, found


def test_the_data_pipeline_imports_nothing_of_the_trainer():
    """data_pipeline/ is the lower layer (batch format, latent tokens, loader): no import of ilvr anywhere in
    it, function-level ones included; and importing its entry modules loads no ilvr module."""
    found = [f"{p.relative_to(REPO)}:{line}: {module}" for p in _modules("data_pipeline")
             for module, _, line in _imports(p) if module == "ilvr" or module.startswith("ilvr.")]
    assert not found, found
    code = ("import data_pipeline.loader, data_pipeline.pipeline, data_pipeline.prepare, data_pipeline.tiny_processor, "
            "data_pipeline.preview, sys; print([m for m in sys.modules if m.startswith('ilvr')])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
