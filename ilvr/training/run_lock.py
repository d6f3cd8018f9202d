"""One job per output dir: `<output_dir>/.lock` (flock), taken by ilvr-train (`train.output_dir`) and
`ilvr-eval` (`--out`); the holder (host, pid, start, Slurm job) is recorded in it for the refusal message.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from ilvr.training.distributed import all_gather_json, rank_world

LOCK_FILE = ".lock"


class OutputDirBusy(RuntimeError):
    """Another live job holds `<output_dir>/.lock`; the message names it."""


_HELD: dict[str, int] = {}  # realpath of an output dir -> the open, flock'ed lock file (kept for the process life)


def _lock_holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


def _describe_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8", errors="replace"))
        job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
        return f"pid {holder['pid']} on {holder['host']}{job}, started {holder['started']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "a process that has not recorded itself yet"


def holds_lock(output_dir: str) -> bool:
    """Whether this process holds `<output_dir>/.lock`."""
    return os.path.realpath(output_dir) in _HELD


def lock_output_dir(output_dir: str, setting: str = "train.output_dir") -> str:
    """Take `<output_dir>/.lock` (flock, exclusive, non-blocking) for the rest of this process's life and
    record the holder (host, pid, start time) in it; raise OutputDirBusy naming the holder if another
    process has it. The OS releases it when the process ends, however it ends. `setting` is the option
    that named the dir (`train.output_dir`, `ilvr-eval --out`), for the message."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    if holds_lock(output_dir):
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe_holder(fd)
        os.close(fd)
        raise OutputDirBusy(f"{setting}={output_dir!r} is in use by another job ({holder}; lock file "
                            f"{path}). Two jobs in one output dir overwrite each other's files (checkpoints, "
                            f"metrics, predictions): wait for it to end, stop it, or choose another {setting}") from None
    except OSError as e:
        os.close(fd)
        raise OutputDirBusy(f"cannot lock {path} ({e}); the file system must support flock") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(_lock_holder()) + "\n").encode("utf-8"), 0)
    os.fsync(fd)
    _HELD[os.path.realpath(output_dir)] = fd
    return path


def claim_output_dir(output_dir: str, setting: str = "train.output_dir") -> None:
    """Collective: rank 0 takes the output dir's lock and every rank learns the outcome, so on a refusal
    all ranks raise OutputDirBusy with rank 0's message (none waits for the others)."""
    rank, _ = rank_world()
    error = None
    if rank == 0:
        try:
            lock_output_dir(output_dir, setting)
        except OutputDirBusy as e:
            error = str(e)
        except OSError as e:
            error = f"cannot create the lock in {setting}={output_dir!r}: {e}"
    error = all_gather_json(error)[0]
    if error:
        raise OutputDirBusy(error)
