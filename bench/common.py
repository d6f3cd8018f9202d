"""What the bench scripts share: the common flags, timing (a per-phase clock, medians of interleaved runs),
a table printer, memory readings and the JSON tail. What each script measures and prints stays in it.

Imports nothing heavy: bench/train.py and bench/loader.py set thread and tokenizer variables before torch loads.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time
from collections import defaultdict
from typing import Any, Callable


def add_common_flags(p: argparse.ArgumentParser, out: "str | None" = "--json",
                     out_help: "str | None" = "also write the results as JSON", threads: "int | None" = 1,
                     threads_help: "str | None" = None, seed: bool = True, seed_help: "str | None" = None) -> None:
    """`--threads N` (torch threads; not if threads is None), `--seed N` (if seed) and the results file
    (`--json PATH` or `--out PATH`: the flag each script documents; none if out is None), in this order."""
    if threads is not None:
        p.add_argument("--threads", type=int, default=threads, help=threads_help)
    if seed:
        p.add_argument("--seed", type=int, default=0, help=seed_help)
    if out:
        p.add_argument(out, metavar="PATH", help=out_help)


# ----------------------------------------------------------------------------- timing


def synchronize() -> None:
    """Wait for the GPU (if torch uses one), so a time ends when the device is done, not when the launch returns."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Clock:
    """Wall time in ms per phase, summed over repeated phases: `with clock("vision"): ...`; clock.ms["vision"]."""

    def __init__(self):
        self.ms: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            synchronize()
            self.ms[phase] += (time.perf_counter() - t0) * 1e3


def interleaved(variants: dict[str, Callable[[], Any]], repeats: dict[str, int],
                no_warmup: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    """Warm each variant up once (except those in `no_warmup`), then run them in turn (A, B, ..., A, B, ...)
    until each has its repeats. Returns per variant the median, min and max in ms and the number of timed runs."""
    for name, fn in variants.items():
        if name not in no_warmup:
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(max(repeats.values())):
        for name, fn in variants.items():
            if r < repeats[name]:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts), "runs": len(ts)}
            for name, ts in times.items()}


# ----------------------------------------------------------------------------- printing and results


def table(header: list[str], rows: list[list]) -> None:
    """Right-aligned columns, indented by two spaces; numbers are formatted by the caller."""
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        print("  " + " ".join(f"{x!s:>{w}}" for x, w in zip(row, widths)))


def write_results(path: "str | None", results: dict, indent: int = 2, default: "Callable | None" = None,
                  say: "str | None" = "  results written to {path}") -> None:
    """The JSON tail: write `results` to `path` (nothing without one) and print `say` (None: nothing)."""
    if not path:
        return
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=indent, default=default)
    if say:
        print(say.format(path=path))


# ----------------------------------------------------------------------------- memory


def current_rss() -> "int | None":
    """Resident set size of this process in bytes (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_gpu_bytes(device) -> "int | None":
    """Peak GPU memory allocated by torch since the last reset (None on the CPU)."""
    import torch

    return torch.cuda.max_memory_allocated() if device.type == "cuda" else None
