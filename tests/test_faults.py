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
