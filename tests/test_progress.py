"""The step line's ETA counts stage 2's slower steps (ilvr/training/progress.py)."""
from __future__ import annotations

import pytest

from ilvr.training.progress import STAGE2_COST_PRIOR, StepClock, remaining_steps


def test_remaining_steps_split_by_stage():
    assert remaining_steps("1+2", 450, 600, 100) == {1: 350, 2: 150}
    assert remaining_steps("1+2", 450, 600, 500) == {1: 0, 2: 100}
    assert remaining_steps("1", 0, 600, 100) == {1: 500} and remaining_steps("2", 0, 600, 600) == {2: 0}


def test_stage_two_is_estimated_slower_until_timed_then_at_its_own_pace():
    clock = StepClock()
    for step in range(1, 11):  # stage 1: 0.4 s per step
        clock.tick(now=100 + 0.4 * step, step=step, stage=1, step_s=0.4)
    left = clock.seconds_left(remaining_steps("1+2", 450, 600, 10))
    assert left == pytest.approx(440 * 0.4 + 150 * 0.4 * STAGE2_COST_PRIOR)
    for step in range(451, 461):  # stage 2 measured at 0.9 s per step
        clock.tick(now=1000 + 0.9 * (step - 450), step=step, stage=2, step_s=0.9)
    assert clock.seconds_left(remaining_steps("1+2", 450, 600, 460)) == pytest.approx(140 * 0.9)


def test_a_stage_two_run_is_estimated_from_its_own_steps():
    clock = StepClock()
    assert clock.seconds_left({2: 10}) == 0.0  # nothing timed yet
    clock.tick(now=10.0, step=1, stage=2, step_s=2.0)
    assert clock.seconds_left({2: 10}) == pytest.approx(20.0)
