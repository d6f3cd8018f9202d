"""Which module may import which (issue 24): the imports are read with `ast`, nothing is run but the
subprocess that imports the data pipeline alone."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

from tests.conftest import REPO

PACKAGES = ("ilvr", "data_pipeline", "bench", "scripts")  # everything that is not a test


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


def _module_names() -> dict[str, pathlib.Path]:
    """Dotted name -> file of every module in PACKAGES (a package by its own name, not `.__init__`)."""
    out = {}
    for p in _modules(*PACKAGES):
        name = ".".join(p.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_imports_another_modules_private_names():
    """`from m import _x` and `m._x` (m an imported project module) in ilvr/, data_pipeline/, bench/ and
    scripts/: a name another file needs is public in the module that owns it."""
    modules = _module_names()
    found = []
    for p in modules.values():
        imports = _imports(p)
        found += [f"{p.relative_to(REPO)}:{line}: from {module} import {name}" for module, name, line in imports
                  if name and _private(name)]
        bound = {}  # local name -> project module it is bound to
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"), str(p))):
            if isinstance(node, ast.Import):
                bound.update({a.asname or a.name: a.name for a in node.names if a.name in modules})
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                bound.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names
                              if f"{node.module}.{a.name}" in modules})
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"), str(p))):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                base = ast.unparse(node.value)
                if base in bound or base in modules:
                    found.append(f"{p.relative_to(REPO)}:{node.lineno}: {base}.{node.attr}")
    assert not found, "make the shared name public in the module that owns it:\n" + "\n".join(found)


def test_no_import_circles():
    """Module-level imports (not those under `if TYPE_CHECKING:` nor inside functions) between the project's
    modules form no circle: each module can be read, and imported, on top of the ones it names."""
    modules = _module_names()
    graph: dict[str, set[str]] = {}
    for name, p in modules.items():
        deps = set()
        for node in ast.parse(p.read_text(encoding="utf-8"), str(p)).body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            nested = isinstance(node, (ast.If, ast.Try))
            for imp in ast.walk(node) if nested else [node]:
                if isinstance(imp, ast.Import):
                    deps |= {a.name for a in imp.names}
                elif isinstance(imp, ast.ImportFrom) and imp.level == 0 and imp.module:
                    deps |= {f"{imp.module}.{a.name}" if f"{imp.module}.{a.name}" in modules else imp.module
                             for a in imp.names}
        graph[name] = {d for d in deps if d in modules and d != name}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    circles = []

    def visit(u: str) -> None:
        state[u] = 1
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                circles.append(" -> ".join(path[path.index(v):] + [v]))
            elif v not in state:
                visit(v)
        path.pop()
        state[u] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert graph["ilvr.training.tracking"] >= {"ilvr.training.send_queue"}, "the graph misses imports"
    assert not circles, "\n".join(circles)


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


# ilvr's layers, lowest first: a module imports (function-level and type-only imports included) from its own
# layer or the ones below it, never from above. Evaluation during training is handed to the Trainer by the entry
# point (Trainer(..., evaluation=PeriodicEval)) for this reason.
LAYERS = (
    ("data_pipeline",),
    ("ilvr.fileio", "ilvr.config_schema", "ilvr.config_yaml", "ilvr.config_checks", "ilvr.config"),
    ("ilvr.model",),
    ("ilvr.training",),
    ("ilvr.export",),
    ("ilvr.evaluation",),
    ("ilvr.train", "ilvr.evaluate", "ilvr.data_preview"),
)


def _layer(module: str) -> "int | None":
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def test_every_import_runs_down_the_layers():
    modules = _module_names()
    placed = [name for name in modules if name.split(".")[0] in ("ilvr", "data_pipeline") and name != "ilvr"]
    assert all(_layer(name) is not None for name in placed), [n for n in placed if _layer(n) is None]
    found = []
    for name in placed:
        for module, _, line in _imports(modules[name]):
            target = _layer(module)
            if target is not None and target > _layer(name):
                found.append(f"{modules[name].relative_to(REPO)}:{line}: {module} (layer {target} > {_layer(name)})")
    assert "ilvr.training.trainer" in placed and "ilvr.evaluation.periodic" in placed
    assert not found, "an import runs up the layers:\n" + "\n".join(found)
