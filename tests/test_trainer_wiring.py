"""The training loop's wiring of the method, on 2 gloo ranks in-process (ZeRO-3, grad_accum 2):
stage-1 targets come from the momentum teacher's module (never the student), the teacher is
updated exactly once per optimizer step (not per micro-batch, and not in stage 2), the
selected-count histogram reaches metrics.jsonl (a list) and the tracker (one fraction per bucket), and
the comm/* accounting is logged per step.
"""
from __future__ import annotations

import json
import os

import pytest

from ilvr.training.spawn import run_on_ranks
from tests.conftest import REPO
from tests.factories import synthetic_vsp_shards

pytestmark = pytest.mark.slow


def _train_with_spies(rank: int, world_size: int, out_dir: str, shards: str, processor: str) -> dict:
    import deepspeed

    import ilvr.model.stage1 as stage1
    from ilvr.config import load_config
    from ilvr.training import trainer as trainer_module
    from ilvr.training.teacher import MomentumTeacher

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config([str(REPO / "configs" / "tiny_cpu.yaml")], [
        f"train.output_dir={out_dir}", f"data.train_shards={shards}", "data.eval_shards=", f"data.processor={processor}",
        "data.num_workers=0", "data.batch_size=2", "train.grad_accum=2", "train.stage1_steps=3", "train.max_steps=4",
        "train.save_every=0", "train.log_every=1", "train.warmup_steps=0", "train.comm_stats=true"])
    trainer = trainer_module.Trainer(cfg, ds_config=str(REPO / "ds_configs" / "zero3.json"), resume="never")
    calls: dict = {"loss": [], "update": []}
    real_loss, real_update = stage1.stage1_loss, MomentumTeacher.update

    def loss_spy(student, teacher, *args, **kwargs):
        calls["loss"].append([student is trainer.engine.module, teacher is trainer.teacher.module,
                              teacher is not student])
        return real_loss(student, teacher, *args, **kwargs)

    def update_spy(self):
        calls["update"].append([trainer.engine.global_steps, trainer.step])
        return real_update(self)

    stage1.stage1_loss, MomentumTeacher.update = loss_spy, update_spy
    try:
        trainer.run()
    finally:
        stage1.stage1_loss, MomentumTeacher.update = real_loss, real_update
    calls["global_steps"] = trainer.engine.global_steps
    return calls


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return synthetic_vsp_shards(str(tmp_path_factory.mktemp("wiring_shards")), 32, seed=3)


def test_teacher_targets_and_one_ema_update_per_optimizer_step(tmp_path, shards, tiny_processor_dir):
    out = str(tmp_path / "run")
    results = run_on_ranks(_train_with_spies, world_size=2, timeout=300, out_dir=out, shards=shards,
                           processor=tiny_processor_dir)
    for calls in results:
        assert len(calls["loss"]) == 3 * 2  # 3 stage-1 steps x 2 micro-batches
        assert all(c == [True, True, True] for c in calls["loss"]), calls["loss"]
        # after each optimizer step of stage 1, once: DeepSpeed's step counter has just moved
        assert calls["update"] == [[1, 0], [2, 1], [3, 2]], calls["update"]
        assert calls["global_steps"] == 4
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    stage1_rows = [r for r in rows if r["stage"] == 1.0]
    assert len(stage1_rows) == 3
    for r in stage1_rows:
        hist = r["latent/selected_hist"]
        assert isinstance(hist, list) and len(hist) == 4 and sum(hist) > 0
        for key in ("latent/align_first", "latent/align_copy", "latent/selected_mean", "latent/changed_share",
                    "latent/changed_chance"):
            assert key in r
        assert r["latent/changed_segments"] > 0  # VSP helpers share the previous image's grid: measured
    from ilvr.training.mlflow_store import scalar_metrics

    scalars = scalar_metrics(stage1_rows[0])
    assert abs(sum(scalars[f"latent/selected_k{j}"] for j in range(1, 5)) - 1.0) < 1e-9
    # comm accounting (train.comm_stats): stage 2 gathers the model once per micro-batch (train.gather_once),
    # no more than stage 1 (teacher once + student forward and backward)
    stage2 = [r for r in rows if r["stage"] == 2.0][-1]
    for r in (stage1_rows[-1], stage2):
        assert r["comm/all_gather_calls"] > 0 and r["comm/all_gather_bytes"] > 0 and r["comm/reduce_scatter_bytes"] > 0
    assert stage2["comm/all_gather_bytes"] <= 1.5 * stage1_rows[-1]["comm/all_gather_bytes"], (stage2, stage1_rows[-1])
