"""The ETA on every step line, per stage: stage-2 steps cost more than stage-1 steps.

Stage 2 runs the decoder once per latent segment with a KV cache; on the quick start's recipe a step takes
1.64x a stage-1 step (bench/quickstart_step.py, 2026-12-02: 0.699 s vs 0.427 s). An ETA from stage 1's pace
alone promised the quick start ~25% too early. Until stage 2 has been timed, its steps are estimated at
STAGE2_COST_PRIOR x stage 1's; from its first step on, at their own measured pace.
"""
from __future__ import annotations

STAGE2_COST_PRIOR = 1.64


class StepClock:
    """Wall time per optimizer step of each stage since this process first logged one (data, logging and
    saving included), and the time left for the steps still to come."""

    def __init__(self) -> None:
        self._start: dict[int, tuple[float, int]] = {}  # stage -> (time before its first timed step, that step - 1)
        self._pace: dict[int, float] = {}  # stage -> seconds per step

    def tick(self, now: float, step: int, stage: int, step_s: float) -> None:
        """Record that optimizer step `step` (1-based) of `stage` ended at `now` after `step_s` seconds."""
        if stage not in self._start:
            self._start[stage] = (now - step_s, step - 1)
        start, first = self._start[stage]
        self._pace[stage] = (now - start) / max(step - first, 1)

    def seconds_left(self, remaining: dict[int, int]) -> float:
        """The ETA for `remaining` = {stage: steps still to run}; a stage not yet timed is estimated from
        stage 1 (stage 2 at STAGE2_COST_PRIOR x) or from whatever was timed."""
        if not self._pace:
            return 0.0

        def pace(stage: int) -> float:
            if stage in self._pace:
                return self._pace[stage]
            if stage == 2 and 1 in self._pace:
                return self._pace[1] * STAGE2_COST_PRIOR
            return next(iter(self._pace.values()))

        return sum(n * pace(stage) for stage, n in remaining.items() if n > 0)


def remaining_steps(stage: str, stage1_steps: int, max_steps: int, step: int) -> dict[int, int]:
    """{stage: optimizer steps after `step` (done so far) that train that stage} for train.stage `stage`."""
    left = max(max_steps - step, 0)
    if stage == "1+2":
        first = min(max(stage1_steps - step, 0), left)
        return {1: first, 2: left - first}
    return {int(stage): left}
