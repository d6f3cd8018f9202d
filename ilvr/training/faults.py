"""Turning signals and bad steps into orderly decisions that every rank takes together.

A SIGTERM (preemption, `scancel`) or SIGUSR1 (Slurm's warning before the time limit)
only sets a flag; the loop checkpoints at the next step boundary and exits. A NaN/Inf
loss skips the step; too many in a row stop the run with a clear error. The decisions
are agreed over all ranks (one tiny all-reduce per step), so no rank waits alone in a
collective.
"""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


class StopRequest:
    """Remembers the first SIGTERM / SIGUSR1 received; restores the previous handlers on close()."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.received: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            log.warning("received %s: saving a checkpoint at the next step boundary, then exiting", self.received)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class BadStepGuard:
    """Counts consecutive non-finite losses; raises once more than `max_in_a_row` occurred."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0

    def record(self, bad: bool, step: int) -> None:
        if not bad:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        log.warning("non-finite loss at step %d: step skipped (%d in a row, %d in all)", step, self.in_a_row,
                    self.total)
        if self.in_a_row >= self.max_in_a_row:
            raise FloatingPointError(
                f"{self.in_a_row} consecutive steps had a NaN/Inf loss (train.max_bad_steps={self.max_in_a_row}); "
                "lower train.lr or check the data, then resume: --resume auto takes the newest checkpoint marked "
                "healthy at its save (the log says which)")
