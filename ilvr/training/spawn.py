"""Run a function on N gloo ranks on CPU, in fresh processes, and collect what each returns.

    results = run_on_ranks(check_fn, world_size=2, some_arg=1)   # results[rank]

Distributed code is unit-tested this way, in-process, with no launcher; the benchmarks
use it to measure 2 ranks side by side.

`fn` must be a module-level function (it is sent to spawned processes by reference).
It runs with torch.distributed initialised (gloo) and gets `rank` and `world_size` as
its first two arguments. A failure on any rank is raised here with that rank's
traceback; a hang is killed after `timeout` seconds.
"""
from __future__ import annotations

import os
import queue as queue_module
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, queue, timeout, kwargs):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
        result = fn(rank, world_size, **kwargs)
        queue.put((rank, True, result))
    except BaseException:  # report everything, including assertion errors
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(fn: Callable[..., Any], world_size: int = 2, timeout: float = 120, **kwargs) -> list[Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, queue, min(timeout, 600), kwargs))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    deadline = time.monotonic() + timeout
    # read while the ranks run: a rank blocks on a full pipe until its (large) result is read
    while len(results) + len(errors) < world_size and time.monotonic() < deadline:
        try:
            rank, ok, value = queue.get(timeout=0.2)
        except queue_module.Empty:
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
            continue
        if ok:
            results[rank] = value
        else:
            errors.append(f"rank {rank} failed:\n{value}")
    hung = [r for r, p in enumerate(procs) if p.is_alive() and r not in results]
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    if hung:
        raise TimeoutError(f"ranks {hung} still running after {timeout} s")
    missing = [r for r in range(world_size) if r not in results]
    if missing:
        codes = {r: procs[r].exitcode for r in missing}
        raise AssertionError(f"ranks {missing} returned nothing (exit codes {codes})")
    return [results[r] for r in range(world_size)]
