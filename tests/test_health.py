"""Checkpoint health (issue 22): diverged checkpoints are recorded as such, never pruned into being the
only one, never resumed from or exported by default; checkpoints without a record still resume.

The checks and the manager's protocol run fast here (a stand-in engine); tests/test_train.py has the
2-rank run that diverges for real."""
from __future__ import annotations

import json
import logging
import math
import os

import pytest
import torch

from ilvr.config import TrainConfig
from ilvr.training.checkpoint import CheckpointManager, latest, resolve_resume, unhealthy
from ilvr.training.checkpoint_verify import CheckpointError, verify_checkpoint
from ilvr.training.health import LossWatch, read_health, verdict, weight_stats
from tests.test_checkpoint import FakeEngine

HEALTHY = {"healthy": True, "problems": [], "weight_rms": 0.06, "nonfinite_weights": 0, "grad_norm": 9.0}
SICK = {"healthy": False, "problems": ["weight RMS 2.1e+05 > train.health_max_weight_rms=100"],
        "weight_rms": 2.1e5, "nonfinite_weights": 0, "grad_norm": 8.5}


def save(manager: CheckpointManager, step: int, health: "dict | None") -> str:
    return manager.save(FakeEngine(step), step, {"health": health} if health is not None else {})


def test_weight_stats_count_nonfinite_weights_and_measure_the_rest():
    module = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[3.0, 4.0], [float("nan"), 0.0]]))
    stats = weight_stats(module)
    assert stats["nonfinite_weights"] == 1
    assert stats["weight_rms"] == pytest.approx(math.sqrt(25 / 4))


def test_verdict_names_each_check_and_its_field():
    t = TrainConfig()
    quiet = LossWatch()
    assert verdict({"weight_rms": 0.06, "nonfinite_weights": 0}, 9.0, quiet, t)["healthy"]
    record = verdict({"weight_rms": 7e9, "nonfinite_weights": 3}, float("nan"), quiet, t)
    assert not record["healthy"] and record["grad_norm"] == "nan"  # strict JSON
    text = " ".join(record["problems"])
    assert "3 weights are NaN/Inf" in text and "train.health_max_weight_rms=100" in text and "gradient norm nan" in text
    assert "train.health_max_grad_norm" in verdict({"weight_rms": 1.0, "nonfinite_weights": 0}, 1e7, quiet,
                                                   t)["problems"][0]
    off = TrainConfig(health_max_weight_rms=0, health_max_grad_norm=0)
    assert verdict({"weight_rms": 7e9, "nonfinite_weights": 0}, 1e9, quiet, off)["healthy"]


def test_an_fp16_overflow_step_is_not_divergence():
    """fp16's loss scaler skips the update of a step whose gradients overflowed (grad_norm inf): the weights are
    the last good ones, so the checkpoint is healthy (a run ending on such a step must not fail as diverged)."""
    t, quiet = TrainConfig(), LossWatch()
    fine = {"weight_rms": 0.06, "nonfinite_weights": 0}
    assert verdict(fine, float("inf"), quiet, t, loss_scaled=True)["healthy"]
    assert not verdict(fine, float("inf"), quiet, t)["healthy"]  # bf16 / fp32: nothing skipped the update
    assert not verdict({"weight_rms": 7e9, "nonfinite_weights": 0}, float("inf"), quiet, t, loss_scaled=True)["healthy"]


def test_the_loss_spike_rule_wants_a_sustained_jump_within_a_stage():
    t = TrainConfig()
    watch = LossWatch()
    for loss in [6.8, 6.7, 6.5, 6.6, 6.4, 6.3]:
        watch.add(1, loss)
    watch.add(1, 30.0)  # one odd batch: the median of the last 3 is not moved
    assert verdict({"weight_rms": 1.0, "nonfinite_weights": 0}, 1.0, watch, t)["healthy"]
    watch.add(1, 25.0)
    watch.add(1, 28.0)
    record = verdict({"weight_rms": 1.0, "nonfinite_weights": 0}, 1.0, watch, t)
    assert not record["healthy"] and "train.health_loss_spike=5" in record["problems"][0]
    restored = LossWatch(json.loads(json.dumps(watch.state())))  # saved in trainer.json, restored on resume
    assert restored.spike() == watch.spike()
    watch.add(2, 40.0)  # stage 2 has its own losses: no history to compare with yet
    assert verdict({"weight_rms": 1.0, "nonfinite_weights": 0}, 1.0, watch, t)["healthy"]


def test_pruning_keeps_the_newest_healthy_checkpoint_and_resume_takes_it(tmp_path, caplog):
    out = str(tmp_path)
    manager = CheckpointManager(out, keep_last=1)
    step1 = save(manager, 1, HEALTHY)
    for step in (2, 3):
        save(manager, step, SICK)
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == ["latest", "step-1", "step-3"]  # keep_last=1, and the healthy one
    assert (root / "latest").read_text().strip() == "step-1"  # the pointer never moves to an unhealthy one
    assert latest(out) == step1
    assert [p for p, _ in unhealthy(out)] == [str(root / "step-3")]
    with caplog.at_level(logging.WARNING):
        assert resolve_resume("auto", out) == step1
    assert "using " + step1 + ", the newest healthy checkpoint" in caplog.text and "step-3 (weight RMS" in caplog.text
    save(manager, 4, HEALTHY)  # a recovered run: the new healthy one counts, the old ones go
    assert sorted(os.listdir(root)) == ["latest", "step-4"]


def test_a_run_with_only_unhealthy_checkpoints_is_never_restarted_silently(tmp_path):
    out = str(tmp_path)
    manager = CheckpointManager(out, keep_last=2)
    sick = save(manager, 1, SICK)
    with pytest.raises(CheckpointError, match=r"every checkpoint of .* is marked unhealthy: step-1 \(weight RMS"):
        resolve_resume("auto", out)
    assert resolve_resume(sick, out) == sick  # named explicitly: used, with a warning


def test_a_checkpoint_without_a_health_record_resumes_with_a_warning(tmp_path, caplog):
    out = str(tmp_path)
    old = save(CheckpointManager(out), 5, None)
    assert read_health(old) is None
    with caplog.at_level(logging.WARNING):
        assert resolve_resume("auto", out) == old
    assert "no health record" in caplog.text and "healthy-unknown" in caplog.text


def test_the_health_record_is_covered_by_the_checkpoint_hashes(tmp_path):
    sick = save(CheckpointManager(str(tmp_path)), 3, SICK)
    path = os.path.join(sick, "trainer.json")
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    state["health"] = HEALTHY
    with open(path, "w", encoding="utf-8") as f:
        json.dump(state, f)
    with pytest.raises(CheckpointError, match="trainer.json: sha256"):
        verify_checkpoint(sick)


def test_export_refuses_nonfinite_weights_naming_them():
    from ilvr.export import refuse_nonfinite

    refuse_nonfinite({"a": torch.ones(2), "steps": torch.tensor([3])}, "ckpt")
    with pytest.raises(CheckpointError, match=r"ckpt: 2 NaN/Inf weights in 1 tensors: b \(2\)"):
        refuse_nonfinite({"a": torch.ones(2), "b": torch.tensor([float("inf"), float("nan"), 1.0])}, "ckpt")


def test_starting_in_a_run_dir_with_only_unhealthy_checkpoints_is_refused(tmp_path):
    from ilvr.config import load_config
    from ilvr.training.run_dir import RunDirRefused, plan_run

    out = str(tmp_path / "run")
    save(CheckpointManager(out), 3, SICK)
    cfg = load_config(None, [f"train.output_dir={out}"], check_paths=False)
    with pytest.raises(RunDirRefused, match="every checkpoint of .* is marked unhealthy"):
        plan_run(cfg, "auto")  # not taken for a fresh run in a dir that holds one
    with pytest.raises(RunDirRefused, match="already holds a run"):
        plan_run(cfg, "never")
