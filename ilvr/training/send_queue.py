"""The tracker's delivery queue: calls to a store that may be down, sent by one background thread.

    queue = SendQueue(send, backfill, warn, max_pending=4096, max_backoff_s=60)
    queue.submit(Call("metrics", [("loss", 1.2)], step=10))   # returns at once
    queue.start()                                              # the sender thread

Knows nothing of MLflow: `send(batch)` delivers queued calls (consecutive metric steps coalesced up to
MAX_METRICS_PER_BATCH), `backfill(gap)` delivers metric steps that were dropped from memory ([lo, hi, count],
read back from metrics.jsonl by the tracker). A transient error puts the calls back at the front and retries after
an exponential backoff; a permanent one (4xx, a bad value) gives them up, one by one if a coalesced batch was
refused. Past `max_pending` calls the oldest metric steps are dropped into the gap (other calls are lost).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

from ilvr.training.mlflow_store import MAX_METRICS_PER_BATCH
from ilvr.training.run_record import METRICS_FILE

logger = logging.getLogger("ilvr.training.tracking")  # the tracker's own messages: one logger to filter


def permanent(err: BaseException) -> bool:
    """Errors a retry cannot fix: a 4xx answer (but 429), a missing file, a bad value."""
    if isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
                        ValueError, TypeError)):
        return True
    status = getattr(err, "get_http_status_code", None)
    if callable(status):
        code = status()
        return 400 <= code < 500 and code != 429
    return False


class Call:
    """One queued call: a metric step (kind "metrics", coalesced with its neighbours) or a closure."""
    __slots__ = ("kind", "step", "stamp", "data")

    def __init__(self, kind: str, data, step: "int | None" = None):
        self.kind, self.data, self.step, self.stamp = kind, data, step, int(time.time() * 1000)


class SendQueue:
    """Bounded, retried delivery of Calls; `lost` counts calls given up, `overflowed` metric steps dropped
    from memory (delivered later through `backfill`)."""

    def __init__(self, send: Callable[[list[Call]], None], backfill: Callable[[list], None],
                 warn: Callable[[str, BaseException, str], None], max_pending: int, max_backoff_s: float):
        self.send, self.backfill, self.warn = send, backfill, warn
        self.max_pending = max(1, max_pending)
        self.lost = 0
        self.overflowed = 0
        self._warned: set[str] = set()
        self._max_backoff = max(max_backoff_s, 0.01)
        self._backoff = min(1.0, self._max_backoff)
        self._retry_at = 0.0  # monotonic time before which the sender does not try again
        self._down_since: "float | None" = None
        self._cond = threading.Condition()
        self._queue: collections.deque[Call] = collections.deque()
        self._inflight: list[Call] = []
        self._inflight_gap: "list | None" = None
        self._gap: "list | None" = None  # [lo, hi, count] of metric steps to backfill from metrics.jsonl
        self._split = 0  # send the next n calls one by one (a coalesced batch was refused)
        self._thread: "threading.Thread | None" = None
        self._closing = False  # the caller is waiting for the end: retry sooner
        self._stopped = False

    # ------------------------------------------------------------------ what the tracker asks
    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stopped

    def set_gap(self, lo: int, hi: int, count: int) -> None:
        """Metric steps lo..hi (count of them) to deliver through `backfill` once the sender runs."""
        with self._cond:
            self._gap = [lo, hi, count]

    def pending_steps(self) -> int:
        calls = list(self._queue) + self._inflight
        gaps = (self._gap, self._inflight_gap)
        return sum(c.kind == "metrics" for c in calls) + sum(g[2] for g in gaps if g)

    def pending(self) -> int:
        """Undelivered calls, each metric step counted once."""
        with self._cond:
            return self.pending_steps() + sum(c.kind != "metrics" for c in [*self._queue, *self._inflight])

    def first_pending(self) -> "int | None":
        steps = [c.step for c in list(self._queue) + self._inflight if c.kind == "metrics"]
        steps += [g[0] for g in (self._gap, self._inflight_gap) if g]
        return min(steps) if steps else None

    def flush(self, timeout: float) -> bool:
        """Wait until every queued call was delivered or given up (at most `timeout` s); True if so."""
        with self._cond:
            return self._cond.wait_for(lambda: self._idle() or self._thread is None, timeout)

    def hurry(self) -> None:
        """The caller waits for the end: retry within a second from now on."""
        with self._cond:
            self._closing = True
            self._retry_at = min(self._retry_at, time.monotonic() + 1.0)
            self._cond.notify_all()

    def stop(self) -> tuple[int, "int | None"]:
        """Stop the sender; returns (undelivered metric steps, the first of them)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            return self.pending_steps(), self.first_pending()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._thread.start()

    def _idle(self) -> bool:
        return not (self._queue or self._inflight or self._gap or self._inflight_gap)

    # ------------------------------------------------------------------ the queue and its sender
    def submit(self, call: Call) -> None:
        """Before the sender runs (inside start): try at once, queue on failure. After: queue only."""
        if self._thread is None:
            try:
                self.send([call])
                return
            except Exception as e:
                if permanent(e):
                    self._give_up([call], e)
                    return
                self._down(e)
        with self._cond:
            self._queue.append(call)
            while len(self._queue) > self.max_pending:
                self._drop(self._queue.popleft())
            self._cond.notify()

    def _drop(self, call: Call) -> None:
        """The queue is full: forget the oldest call; a metric step is backfilled from metrics.jsonl later."""
        if call.kind != "metrics":
            self.lost += 1
            return
        self.overflowed += 1
        if self._gap:
            self._gap = [min(self._gap[0], call.step), max(self._gap[1], call.step), self._gap[2] + 1]
        else:
            self._gap = [call.step, call.step, 1]

    def _take(self) -> list[Call]:
        """The next call, or consecutive metric steps coalesced up to MLflow's batch limit."""
        batch = [self._queue.popleft()]
        if batch[0].kind == "metrics" and not self._split:
            n = len(batch[0].data)
            while self._queue and self._queue[0].kind == "metrics" and n + len(self._queue[0].data) <= \
                    MAX_METRICS_PER_BATCH:
                n += len(self._queue[0].data)
                batch.append(self._queue.popleft())
        self._split = max(0, self._split - 1)
        return batch

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (self._idle() or time.monotonic() < self._retry_at):
                    self._cond.wait(None if self._idle() else max(0.0, self._retry_at - time.monotonic()))
                if self._stopped:
                    return
                if self._queue:
                    batch, gap = self._take(), None
                else:
                    batch, gap, self._gap = [], self._gap, None
                self._inflight, self._inflight_gap = batch, gap
            try:
                self.backfill(gap) if gap else self.send(batch)
            except Exception as e:
                self._failed(batch, gap, e)  # warn keeps MLflow's exception (credentials) out of log errors
            else:
                self._up()
            with self._cond:
                self._inflight, self._inflight_gap = [], None
                self._cond.notify_all()

    def _failed(self, batch: list[Call], gap: "list | None", err: Exception) -> None:
        """Transient: back into the queue (front), retry after a backoff. Permanent: split, then give up."""
        with self._cond:
            if not permanent(err):
                if gap:  # merge with steps dropped meanwhile
                    self._gap = gap if not self._gap else [min(gap[0], self._gap[0]), max(gap[1], self._gap[1]),
                                                           gap[2] + self._gap[2]]
                self._queue.extendleft(reversed(batch))
                while len(self._queue) > self.max_pending:
                    self._drop(self._queue.popleft())
            elif len(batch) > 1:
                self._queue.extendleft(reversed(batch))
                self._split = len(batch)
                return
        if permanent(err):
            self._give_up(batch, err) if batch else self._give_up_gap(gap, err)
        else:
            self._down(err)

    def _give_up(self, batch: list[Call], err: Exception) -> None:
        self.lost += len(batch)
        kind = batch[0].kind
        if kind not in self._warned:
            self._warned.add(kind)
            self.warn(kind, err, "The store refused it; not retried.")

    def _give_up_gap(self, gap: list, err: Exception) -> None:
        self.lost += gap[2]
        self.warn("backfill", err, f"Steps {gap[0]}..{gap[1]} are not backfilled.")

    def _down(self, err: Exception) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            self.warn("send", err, f"Training goes on; calls are queued (at most {self.max_pending}, older "
                      f"steps are backfilled from {METRICS_FILE}) and retried with backoff.")
        limit = 1.0 if self._closing else self._max_backoff
        with self._cond:
            self._retry_at = now + min(self._backoff, limit)
            self._backoff = min(2 * self._backoff, self._max_backoff)

    def _up(self) -> None:
        if self._down_since is not None:
            logger.warning("MLflow answers again after %.0f s; sending the %d queued calls",
                           time.monotonic() - self._down_since, len(self._queue))
            self._down_since = None
        self._backoff = min(1.0, self._max_backoff)
