"""Counting what was skipped and why, so bad input is never dropped silently."""
from __future__ import annotations

from collections import Counter


class TooManySkips(RuntimeError):
    """More input was bad than the configured fraction allows."""


class SkipCounter:
    """Counts samples seen and samples skipped per reason; stops the job past a fraction.

    `max_fraction` is checked only after `min_seen` samples, so one bad sample among
    the first few does not stop a run; `check(final=True)` checks it whatever was seen
    (a finite input must also fail when its bad rows all came first). `setting` is the
    knob the message tells the user to raise; `check_each=False` leaves the check to the
    caller (a converter judges the whole input, not a prefix of it).
    """

    def __init__(self, max_fraction: float = 1.0, min_seen: int = 20, what: str = "samples",
                 setting: str = "data.max_skip_fraction", check_each: bool = True):
        self.max_fraction = max_fraction
        self.min_seen = min_seen
        self.what = what
        self.setting = setting
        self.check_each = check_each
        self.seen = 0
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def ok(self, n: int = 1) -> None:
        self.seen += n

    def skip(self, reason: str, detail: str = "", n: int = 1) -> None:
        self.seen += n
        self.skipped[reason] += n
        self.examples.setdefault(reason, detail)
        if self.check_each:
            self.check()

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def check(self, final: bool = False) -> None:
        """Raise TooManySkips past `max_fraction` (before `min_seen` samples only when `final`)."""
        if self.seen == 0 or (self.seen < self.min_seen and not final):
            return
        frac = self.total_skipped / self.seen
        if frac > self.max_fraction:
            raise TooManySkips(
                f"{self.total_skipped} of {self.seen} {self.what} were skipped ({frac:.1%} > "
                f"{self.setting}={self.max_fraction:g}): {self.summary()}. "
                f"Fix the data, or raise {self.setting}."
            )

    def reset(self) -> None:
        self.seen = 0
        self.skipped.clear()

    def merge(self, counts: dict[str, int], seen: int, examples: "dict[str, str] | None" = None) -> None:
        """Add another counter's counts (a loader worker's), with an example per reason when it has one."""
        self.seen += seen
        self.skipped.update(counts)
        for reason, detail in (examples or {}).items():
            if detail:
                self.examples.setdefault(reason, detail)

    def summary(self) -> str:
        if not self.skipped:
            return "nothing skipped"
        parts = [f"{r}={n}" + (f" (e.g. {self.examples[r][:200]})" if self.examples.get(r) else "")
                 for r, n in sorted(self.skipped.items())]
        return ", ".join(parts)

    def as_dict(self) -> dict:
        return {"seen": self.seen, "skipped": dict(self.skipped)}
