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
