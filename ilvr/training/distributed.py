"""Process-group setup for every launcher users run: deepspeed, torchrun, srun.

The rank and world size come from RANK/WORLD_SIZE/LOCAL_RANK (deepspeed, torchrun), else
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (srun with one task per GPU). The collective
timeout is what turns a dead rank into a clean exit of the others instead of a hang.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env(local_rank_arg: int | None = None) -> DistInfo:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    else:
        rank, world, local = 0, 1, 0
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    return DistInfo(rank, world, local)


def share_cpu_threads(env: "dict[str, str] | None" = None) -> "int | None":
    """With several ranks on this host and OMP_NUM_THREADS unset, give this rank its share of torch's
    intra-op threads (torch's own count for one process here, divided by the local ranks); return the
    count set, or None when left alone.

    torchrun sets OMP_NUM_THREADS=1, but the deepspeed launcher sets nothing, so each rank took every
    core: on 2 cores, 2 ranks x 2 threads made the quick start's ZeRO-3 step 1.12x slower
    (docs/benchmarks.md). The launcher's LOCAL_SIZE (torchrun: LOCAL_WORLD_SIZE) is the ranks on this
    host; under srun each task has its own cpuset, which torch's count already reflects.
    """
    env = os.environ if env is None else env
    local = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or 1)
    if env.get("OMP_NUM_THREADS") or local <= 1:
        return None
    threads = max(1, torch.get_num_threads() // local)
    torch.set_num_threads(threads)
    return threads


def init_distributed(info: DistInfo, timeout_s: float) -> None:
    """Start the process group (nccl on CUDA, gloo on CPU) with a bounded collective timeout."""
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s),
                                   rank=info.rank, world_size=info.world_size)
    if backend == "gloo" and info.world_size > 1:
        release_shm_buffer(info.rank)
    log.info("process group: %s, rank %d of %d, collective timeout %ds", backend, info.rank, info.world_size,
             int(timeout_s))


def shm_buffer_path(rank: int, env: "Mapping[str, str] | None" = None) -> str:
    """The shared-memory buffer DeepSpeed's CPU backend gives `rank` when all ranks are on one host
    (deepspeed/ops/csrc/cpu/comm/shm.cpp, shm_initialize)."""
    env = os.environ if env is None else env
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
            f"{env.get('MASTER_PORT', '')}_{rank}")


def release_shm_buffer(rank: int) -> bool:
    """Remove this rank's DeepSpeed shared-memory buffer name once every rank has mapped every buffer.

    With all ranks on one host (the launcher's LOCAL_SIZE = the world size) DeepSpeed's CPU backend creates a
    ~66 MB buffer per rank in /dev/shm and never unlinks it (shm.cpp never calls its shared_close): every
    CPU run left them in RAM until reboot, 17 GB on the 2-core machine after a day of tests and runs, until an
    out-of-memory kill. DeepSpeed maps all ranks' buffers before its init returns, so after a barrier the
    names can go; the mappings (and the fast all-reduce) live on until the processes end, however they end.
    Collective: every rank calls it. Returns whether this rank had a buffer."""
    torch.distributed.barrier()
    try:
        os.unlink(shm_buffer_path(rank))
        return True
    except FileNotFoundError:
        return False


def end_process(code: int) -> int:
    """Leave a process that has a process group without interpreter teardown, with exit status `code`
    (the group destroyed first after success); without a group, just return `code`.

    destroy_process_group() does not stop gloo's worker threads (gloo's Backend.shutdown is a no-op;
    4 pt_gloo_runloop and 2 gloo_tcp_loop threads were still alive after it): they live until the
    group objects are freed, which with DeepSpeed holding group handles is during interpreter
    finalization. The likely path to the abort seen once in CI (a finished rank: "terminate called
    without an active exception", SIGABRT, exit -6): a C++ thread that needs the GIL then is ended by
    CPython with pthread_exit, and that unwinding through a noexcept frame aborts. So the atexit
    handlers (MLflow, logging, multiprocessing children) run here while everything is alive, the
    streams are flushed, and the process ends with os._exit. It never hangs in a group destructor
    waiting on a dead peer either. After a failure (code != 0) the group is not destroyed: other
    ranks may still wait in a collective, and destroying it then can deadlock (torchtitan destroys
    only after success for the same reason); the process's end closes its connections.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return code
    if code == 0:
        dist.destroy_process_group()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to save
            pass
    os._exit(code)


LOG_FILE_HANDLER = "ilvr-run-log"  # the name of the handler add_log_file installs (one at a time)


def _log_format(info: DistInfo) -> str:
    return f"%(asctime)s [rank {info.rank}] %(levelname)s %(name)s: %(message)s"


def setup_logging(info: DistInfo) -> None:
    """Rank 0 logs at INFO; other ranks only warnings and errors (with their rank in the line)."""
    level = logging.INFO if info.is_main else logging.WARNING
    logging.basicConfig(level=level, format=_log_format(info), force=True)
    # DeepSpeed calls collectives torch has renamed; the notice would repeat every step
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_log_file(info: DistInfo, path: str) -> str:
    """Rank 0 also writes its log lines to `path` (train.log in the run dir, appended on resume), so a run
    keeps its own log whatever the launcher did with the console; every other rank writes its errors there
    (tracebacks included: a failure on rank 3 is in the run's log, not only in a console nobody kept). The
    other ranks open the file only when they have an error to write. Call after the output dir is claimed."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == LOG_FILE_HANDLER]:
        root.removeHandler(old)
        old.close()
    handler = logging.FileHandler(path, encoding="utf-8", delay=not info.is_main)
    handler.set_name(LOG_FILE_HANDLER)
    handler.setLevel(logging.INFO if info.is_main else logging.ERROR)
    handler.setFormatter(logging.Formatter(_log_format(info)))
    root.addHandler(handler)
    return path


def format_duration(seconds: float) -> str:
    """1h02m, 3m05s, 12s: an ETA short enough for a step line."""
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def all_reduce(values: list[float], op: str = "max") -> list[float]:
    """Element-wise max or sum of a few numbers over ranks (a no-op without a process group)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist = torch.distributed
    if dist.is_initialized() and dist.get_world_size() > 1:
        if torch.cuda.is_available():
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.cpu().tolist()


def summed_over_ranks(counts: dict[str, int]) -> dict[str, int]:
    """Per-key sums of every rank's `counts` (the keys may differ between ranks): skip counts, which each
    rank's loader keeps for its own data only, so rank 0's alone hid what the other ranks lost."""
    total: dict[str, int] = {}
    for rank_counts in all_gather_json({k: int(v) for k, v in counts.items()}):
        for key, n in rank_counts.items():
            total[key] = total.get(key, 0) + n
    return total


def all_gather_json(obj) -> list:
    """Every rank's JSON-serialisable `obj`, in rank order ([obj] without a process group). JSON bytes in
    tensors: nothing is unpickled, whatever another rank sends."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    data = torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8, device=device)
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.long, device=device))
    longest = max(int(n) for n in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:data.numel()] = data
    buffers = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(buffers, padded)
    return [json.loads(bytes(b[:int(n)].cpu().tolist()).decode("utf-8")) for b, n in zip(buffers, sizes)]


def is_distributed() -> bool:
    """Whether a process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) without one."""
    return (torch.distributed.get_rank(), torch.distributed.get_world_size()) if is_distributed() else (0, 1)


def barrier() -> None:
    """A barrier of the default group (a no-op without one)."""
    if is_distributed():
        torch.distributed.barrier()


def _collective_device() -> torch.device:
    nccl = is_distributed() and torch.distributed.get_backend() == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def all_true(flag: bool) -> bool:
    """True on every rank iff `flag` is true on every rank (so all ranks take the same branch)."""
    t = torch.tensor([0 if flag else 1], dtype=torch.int64)
    if is_distributed():
        t = t.to(_collective_device())
        torch.distributed.all_reduce(t)
    return int(t.item()) == 0
