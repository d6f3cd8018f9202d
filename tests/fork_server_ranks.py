"""The tests' ranks (ilvr.training.spawn.run_on_ranks) start from a fork server that has imported the heavy stack.

A spawned rank spends ~10 s of CPU importing torch, DeepSpeed, transformers and the Qwen2.5-VL model before it
does anything; the suite starts ~60 of them. tests/conftest.py points run_on_ranks at `context()` instead: a
"forkserver" context whose server imported those modules once, so each rank is a fork of it. What a rank sees
otherwise stays as with "spawn": a process of its own that shares no memory with pytest (the server never ran a
test), the parent's sys.path, working directory and main module (multiprocessing sends them, as for spawn),
and the parent's environment as it is at the start (set here: a fork server would give its own).

A test that needs interpreters that have imported nothing (tests/test_zero3_build.py) asks for the
`fresh_rank_interpreters` fixture, which gives run_on_ranks torch's plain "spawn" back.
"""
from __future__ import annotations

import multiprocessing
import os

from tests.warm_launch import PRELOAD  # what every rank imports anyway; ilvr.* is left to the ranks


def _with_environ(environ: dict, target, args: tuple, kwargs: dict):
    os.environ.clear()
    os.environ.update(environ)
    return target(*args, **kwargs)


class Process(multiprocessing.context.ForkServerProcess):
    """A process of the fork server that runs its target in the parent's environment of the time it was made."""

    def __init__(self, group=None, target=None, name=None, args=(), kwargs=None, *, daemon=None):
        super().__init__(group, _with_environ, name, (dict(os.environ), target, tuple(args), kwargs or {}),
                         daemon=daemon)


class _Context:
    """get_context("spawn") for run_on_ranks: the fork server's context, the parent's environment per process."""

    Process = Process

    def __init__(self):
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(PRELOAD)

    def __getattr__(self, name):
        return getattr(self._ctx, name)


_context: "_Context | None" = None


class Multiprocessing:
    """Stands in for torch.multiprocessing in ilvr.training.spawn: get_context gives the fork server's."""

    def __init__(self, real):
        self._real = real

    def get_context(self, method=None):
        global _context
        if method != "spawn":
            return self._real.get_context(method)
        if _context is None:
            _context = _Context()
        return _context

    def __getattr__(self, name):
        return getattr(self._real, name)
