"""Test-session speed-up, active only where ILVR_TEST_MLFLOW_TEMPLATE is set (tests/conftest.py sets it and puts
this directory on PYTHONPATH, so the spawned ranks, torchrun workers and CLI subprocesses of the tests get it too).

A new SQLite MLflow store costs ~2.5 s of CPU (MLflow creates the tables, then Alembic runs every migration);
the suite makes ~100 of them. The first store of a session is made by MLflow itself, into the template file;
every later new store is that file copied in (sqlite3's backup API, under SQLite's own locking), then MLflow
goes on exactly as after its own migrations: the same schema, the same revision, checked by MLflow's
_verify_schema. Nothing else is changed: stores that exist, other databases and other URIs take MLflow's path.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

_MODULE = "mlflow.store.db.utils"


def _copy_template(engine, real) -> bool:
    template = os.environ.get("ILVR_TEST_MLFLOW_TEMPLATE")
    url = engine.url
    if not template or url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return False
    import fcntl
    import sqlite3

    import sqlalchemy

    with open(template + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(template):  # the session's first store: MLflow's own migrations, into the template
            part = f"{template}.{os.getpid()}.part"
            made = sqlalchemy.create_engine(f"sqlite:///{part}")
            try:
                real(made)
            finally:
                made.dispose()
            os.replace(part, template)
    src = sqlite3.connect(f"file:{template}?mode=ro", uri=True)
    dst = sqlite3.connect(url.database)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    engine.dispose()  # no pooled connection keeps a view of the empty file
    return True


def _patch(module) -> None:
    real = module._initialize_tables

    def _initialize_tables(engine):
        if not _copy_template(engine, real):
            real(engine)

    _initialize_tables.ilvr_test_template = True
    module._initialize_tables = _initialize_tables


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    if _MODULE in sys.modules:
        if not getattr(sys.modules[_MODULE]._initialize_tables, "ilvr_test_template", False):
            _patch(sys.modules[_MODULE])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


if os.environ.get("ILVR_TEST_MLFLOW_TEMPLATE"):
    install()
