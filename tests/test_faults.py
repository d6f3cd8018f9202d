"""Signals become a checkpoint-and-exit request; non-finite losses are skipped until too many in a row."""
from __future__ import annotations

import os
import signal

import pytest

from ilvr.training.faults import BadStepGuard, StopRequest


def test_bad_steps_are_counted_and_too_many_in_a_row_stop_the_run():
    guard = BadStepGuard(max_in_a_row=3)
    for bad in (True, True, False, True, True):
        guard.record(bad, step=0)
    assert (guard.in_a_row, guard.total) == (2, 4)
    with pytest.raises(FloatingPointError, match="train.max_bad_steps=3"):
        guard.record(True, step=5)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_request_remembers_the_first_signal_and_restores_handlers(sig):
    before = signal.getsignal(sig)
    stop = StopRequest()
    try:
        assert stop.received is None
        os.kill(os.getpid(), sig)
        os.kill(os.getpid(), signal.SIGTERM if sig == signal.SIGUSR1 else signal.SIGUSR1)
        assert stop.received == sig.name
    finally:
        stop.close()
    assert signal.getsignal(sig) == before


# ----------------------------------------------------------------------------- leaving a distributed process

# A child with a one-rank gloo group runs ilvr-train's or ilvr-eval's main with a stand-in for the work: `ok`
# returns, `boom` raises. It registers an atexit handler and leaves a line in stdout's buffer (a pipe).
EXIT_CHILD = r"""
import atexit, os, sys
import torch.distributed as dist
import ilvr.evaluation.cli as eval_cli
import ilvr.training.trainer as trainer_module
from ilvr.train import main as train_main

out, entry, how = sys.argv[1:4]
dist.init_process_group("gloo", init_method="file://" + os.path.join(out, "store"), rank=0, world_size=1)
atexit.register(lambda: open(os.path.join(out, "atexit-ran"), "w").close())

def work(*args):
    print("buffered before exit")
    if how == "boom":
        raise RuntimeError("boom in the work")
    return 0

class StandInTrainer:
    def __init__(self, *args, **kwargs):
        pass

    def run(self):
        return work()

trainer_module.Trainer = StandInTrainer
eval_cli.cmd_run = work
if entry == "train":
    code = train_main(["--config", "configs/tiny_cpu.yaml", "data.train_shards=", "data.eval_shards=",
                       "data.processor=", "train.output_dir=" + os.path.join(out, "run")])
else:
    code = eval_cli.main(["run", "--model", out, "--shards", out, "--out", out])
print("main returned", code)  # never: with a process group, main ends the process
"""


@pytest.mark.parametrize("entry", ["train", "eval"])
@pytest.mark.parametrize("how,code", [("ok", 0), ("boom", 1)])
def test_with_a_process_group_main_ends_the_process_after_atexit_and_flushing(tmp_path, entry, how, code):
    # why: gloo's threads outlive destroy_process_group, and interpreter teardown with them alive can abort a
    # finished rank (SIGABRT, seen once in CI); so ilvr-train and ilvr-eval leave through end_process
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered, as in a job
    proc = subprocess.run([sys.executable, "-c", EXIT_CHILD, str(tmp_path), entry, how], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert proc.stdout == "buffered before exit\n"  # flushed, and main did not return
    assert (tmp_path / "atexit-ran").is_file()  # MLflow's and logging's handlers run the same way
    if how == "boom":
        assert "Traceback" in proc.stderr and "RuntimeError: boom in the work" in proc.stderr


def test_without_a_process_group_end_process_returns_the_code():
    from ilvr.training.distributed import end_process

    assert end_process(5) == 5


def test_each_rank_gets_its_share_of_the_cores_unless_omp_num_threads_is_set():
    import torch

    from ilvr.training.distributed import share_cpu_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(8)  # torch's count for one process on this host
        assert share_cpu_threads({"OMP_NUM_THREADS": "3", "LOCAL_SIZE": "2"}) is None  # the user's choice
        assert share_cpu_threads({}) is None and share_cpu_threads({"LOCAL_SIZE": "1"}) is None  # one rank here
        assert torch.get_num_threads() == 8
        assert share_cpu_threads({"LOCAL_SIZE": "2"}) == 4 == torch.get_num_threads()  # deepspeed launcher
        torch.set_num_threads(8)
        assert share_cpu_threads({"LOCAL_WORLD_SIZE": "16"}) == 1 == torch.get_num_threads()  # never below one
    finally:
        torch.set_num_threads(before)


def _shm_buffers_after_release(rank: int, world_size: int) -> dict:
    import deepspeed
    import deepspeed.comm
    import torch

    from ilvr.training.distributed import release_shm_buffer, shm_buffer_path

    os.environ["LOCAL_SIZE"] = str(world_size)  # all ranks on this host, as the deepspeed launcher says
    deepspeed.init_distributed(dist_backend="gloo")
    created = [os.path.exists(shm_buffer_path(r)) for r in range(world_size)]
    had = release_shm_buffer(rank)
    torch.distributed.barrier()
    left = [os.path.exists(shm_buffer_path(r)) for r in range(world_size)]
    summed = torch.full((4,), rank + 1.0)
    deepspeed.comm.inference_all_reduce(summed)  # the shared-memory all-reduce still works on the mappings
    return {"created": created, "had": had, "left": left, "sum": summed.tolist()}


def test_deepspeeds_shared_memory_buffers_leave_no_name_in_dev_shm():
    """DeepSpeed's CPU backend gives each local rank a ~66 MB /dev/shm buffer and never unlinks it; every CPU run
    left them in RAM until reboot (17 GB after a day of tests here). init_distributed removes the names after a
    barrier; the shared-memory all-reduce keeps working."""
    from ilvr.training.spawn import run_on_ranks

    results = run_on_ranks(_shm_buffers_after_release, world_size=2, timeout=120)
    for r in results:
        assert r["created"] == [True, True] and r["had"], r  # DeepSpeed made them (the op setup.sh builds)
        assert r["left"] == [False, False], r
        assert r["sum"] == [3.0] * 4, r
