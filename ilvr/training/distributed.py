"""Process-group setup for every launcher users run: deepspeed, torchrun, srun.

The rank and world size come from RANK/WORLD_SIZE/LOCAL_RANK (deepspeed, torchrun), else
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (srun with one task per GPU). The collective
timeout is what turns a dead rank into a clean exit of the others instead of a hang.
"""
from __future__ import annotations

import logging
import os
import warnings
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


def init_distributed(info: DistInfo, timeout_s: float) -> None:
    """Start the process group (nccl on CUDA, gloo on CPU) with a bounded collective timeout."""
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s),
                                   rank=info.rank, world_size=info.world_size)
    log.info("process group: %s, rank %d of %d, collective timeout %ds", backend, info.rank, info.world_size,
             int(timeout_s))


def setup_logging(info: DistInfo) -> None:
    """Rank 0 logs at INFO; other ranks only warnings and errors (with their rank in the line)."""
    level = logging.INFO if info.is_main else logging.WARNING
    fmt = f"%(asctime)s [rank {info.rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, force=True)
    # DeepSpeed calls collectives torch has renamed; the notice would repeat every step
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def all_reduce(values: list[float], op: str = "max") -> list[float]:
    """Element-wise max or sum of a few numbers over ranks (a no-op without a process group)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist = torch.distributed
    if dist.is_initialized() and dist.get_world_size() > 1:
        if torch.cuda.is_available():
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.cpu().tolist()
