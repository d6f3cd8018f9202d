"""Evaluation during training (train.eval_every, ilvr/evaluation/periodic.py) and the best checkpoint by it
(train.keep_best): config checks, training left exactly as it was, eval/ rows, best.json and its pruning."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch

from ilvr.config import ConfigError, load_config
from tests.factories import synthetic_vsp_shards


@pytest.mark.parametrize("overrides, message", [
    (["train.eval_every=4", "data.eval_shards="], "train.eval_every=4 evaluates on data.eval_shards, which is empty"),
    (["train.eval_every=-1"], "train.eval_every=-1 must be >= 0"),
    (["train.keep_best=accuracy"], "train.keep_best='accuracy' keeps the checkpoint of the best evaluation during "
                                   "training, and train.eval_every=0 runs none: set train.eval_every"),
    (["train.eval_every=4", "data.eval_shards=x", "train.keep_best=loss"],
     "train.keep_best='loss' is no metric the scorer makes: choose one of accuracy, success_rate"),
    (["train.eval_every=4", "data.eval_shards=x", "train.keep_best=success_rate", "eval.benchmark=comt"],
     "train.keep_best='success_rate' is VSP's metric"),
    (["eval.limit=-2"], "eval.limit=-2 must be >= 0"),
    (["train.eval_every=4", "data.eval_shards=x", "train.keep_best=accuracy", "train.keep_best_mode=best"],
     "train.keep_best_mode='best' is not allowed"),
])
def test_eval_settings_are_checked_before_any_worker_starts(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides, check_paths=False)
    assert message in str(e.value)


def test_a_trainer_built_without_an_evaluator_refuses_train_eval_every():
    """ilvr-train hands the Trainer PeriodicEval; a Trainer built in code without one must not skip evaluations
    silently (its stand-in evaluates never and has no best checkpoint to record)."""
    from ilvr.training.trainer import NoEvaluation

    cfg = load_config(None, ["train.eval_every=5", "data.eval_shards=x"], check_paths=False)
    with pytest.raises(ConfigError, match=r"train.eval_every=5 and this Trainer has no evaluator"):
        NoEvaluation(cfg)
    cfg.train.eval_every = 0
    none = NoEvaluation(cfg)
    assert not none.due(0) and none.pending_at(0) is None

def test_the_metrics_keep_best_accepts_are_those_the_scorer_makes():
    from ilvr.config_schema import RANKED_METRICS
    from ilvr.evaluation.scorers import Score, aggregate

    made = aggregate([Score("R", True, "level3"), Score(None, False, "level4")], "vsp")
    assert set(RANKED_METRICS) <= set(made) and "accuracy/level3" in made
    cfg = load_config(None, ["train.eval_every=2", "data.eval_shards=x", "train.keep_best=eval/unparseable_rate",
                             "eval.limit=3"], check_paths=False)
    assert (cfg.train.keep_best, cfg.eval.limit) == ("eval/unparseable_rate", 3)


def test_keep_best_judges_by_the_metric_and_its_direction():
    from ilvr.evaluation.periodic import PeriodicEval

    cfg = load_config(None, check_paths=False)
    cfg.train.keep_best = "unparseable_rate"  # eval_every 0: no data is read, the judging works the same
    pe = PeriodicEval(cfg, None, None, None, 0, 1, False, 0)
    assert pe.mode == "min"
    pe._judge(2, {"unparseable_rate": 0.5})  # the first evaluation is the best so far
    assert pe.pending_at(2)["value"] == 0.5 and pe.pending_at(3) is None
    pe.saved(2, healthy=True)
    pe._judge(4, {"unparseable_rate": 0.5})  # a tie is no new best
    pe._judge(6, {"unparseable_rate": 0.7})
    assert pe.pending is None and pe.best["step"] == 2
    pe._judge(8, {"unparseable_rate": 0.25})
    pe.saved(8, healthy=False)  # an unhealthy checkpoint never becomes the best
    assert pe.best["step"] == 2
    cfg.train.keep_best_mode = "max"
    assert PeriodicEval(cfg, None, None, None, 0, 1, False, 0).mode == "max"


def test_pruning_never_removes_the_best_checkpoint(tmp_path):
    from ilvr.training.checkpoint import BEST_FILE, CheckpointManager, read_best
    from tests.test_checkpoint import FakeEngine

    manager = CheckpointManager(str(tmp_path), keep_last=1)
    manager.save(FakeEngine(1), 1)
    manager.save(FakeEngine(2), 2, best={"step": 2, "metric": "accuracy", "value": 0.5, "mode": "max"})
    for step in (3, 4):
        manager.save(FakeEngine(step), step)
    root = tmp_path / "checkpoints"
    assert sorted(n for n in os.listdir(root) if n.startswith("step-")) == ["step-2", "step-4"]
    assert read_best(str(tmp_path))["path"] == str(root / "step-2")
    manager.save(FakeEngine(5), 5, best={"step": 5, "metric": "accuracy", "value": 0.75, "mode": "max"})
    manager.save(FakeEngine(6), 6)  # the old best is an ordinary checkpoint again
    assert sorted(n for n in os.listdir(root) if n.startswith("step-")) == ["step-5", "step-6"]
    assert json.loads((root / BEST_FILE).read_text())["checkpoint"] == "step-5"
    (root / BEST_FILE).write_text('{"checkpoint": "step-9"}')  # naming no checkpoint: no best
    assert read_best(str(tmp_path)) is None


@pytest.fixture(scope="module")
def eval_shards(tmp_path_factory) -> str:
    return synthetic_vsp_shards(str(tmp_path_factory.mktemp("eval_shards")), 5, seed=11)


def test_an_evaluation_leaves_rng_and_module_modes_as_they_were(tiny, tiny_model_factory, eval_shards, monkeypatch):
    """In one process on the tiny model: the eval/ metrics as ilvr-eval names them, over eval.limit records;
    every RNG the decoding draws from is put back, and so is each module's train/eval mode."""
    import ilvr.evaluation.evaluate as evaluate
    from ilvr.evaluation.periodic import PeriodicEval

    processor, latent_ids = tiny
    cfg = load_config(None, ["model.latent_size=4", "train.eval_every=2", f"data.eval_shards={eval_shards}",
                             "eval.limit=3", "eval.max_new_tokens=8", "eval.batch_size=2", "eval.benchmark=vsp"],
                      check_paths=False)
    model = tiny_model_factory().train()
    model.model.visual.eval()  # a mix of modes, as a frozen tower may be
    modes = {n: m.training for n, m in model.named_modules()}
    real = evaluate.decode_records

    def drawing(*args, **kwargs):  # decoding that draws from the global RNGs (sampling, dropout would)
        torch.rand(3), random.random()
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "decode_records", drawing)
    pe = PeriodicEval(cfg, model, processor, latent_ids, 0, 1, False, 0)
    assert pe.due(4) and not pe.due(3)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    m = pe.run(2)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert {n: mod.training for n, mod in model.named_modules()} == modes
    assert m["eval/num_samples"] == 3 and 0 <= m["eval/accuracy"] <= 1 and m["eval/seconds"] > 0
    assert {"eval/unparseable_rate", "eval/success_rate", "eval/tokens_per_s"} <= set(m)


# ----------------------------------------------------------------------------- end to end: 2 ranks, ZeRO-3, LoRA

LORA_RUN = ("train.max_steps=4", "train.stage1_steps=2", "train.lr=1e-3", "model.lora.r=8", "model.lora.dropout=0.1",
            "train.save_every=0",
            "train.warmup_steps=1")
EVAL = ("train.eval_every=2", "eval.limit=3", "eval.max_new_tokens=12", "eval.batch_size=2", "train.keep_last=1",
        "train.keep_best=accuracy")


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory) -> str:
    return synthetic_vsp_shards(str(tmp_path_factory.mktemp("train_shards")), 8, seed=7)


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, train_shards, eval_shards, tiny_processor_dir) -> str:
    """model.lora.r=8 under ZeRO-3 on 2 ranks through stage 1 and 2, evaluating at steps 2 and 4 on 3 records
    (2 on rank 0, 1 on rank 1: the ranks decode unequal counts)."""
    from tests.test_train import train

    out = str(tmp_path_factory.mktemp("evaluated") / "run")
    train(out, train_shards, tiny_processor_dir, *LORA_RUN, *EVAL, f"data.eval_shards={eval_shards}")
    return out


@pytest.mark.slow
def test_eval_rows_are_logged_beside_the_losses_through_both_stages(evaluated_run):
    import mlflow

    from tests.test_train import metrics

    m = metrics(evaluated_run)
    assert sorted(m) == [1, 2, 3, 4] and [m[s]["stage"] for s in (2, 4)] == [1.0, 2.0]
    for step in (2, 4):
        assert m[step]["eval/num_samples"] == 3 and 0 <= m[step]["eval/accuracy"] <= 1, m[step]
        assert "loss" in m[step] and m[step]["eval/seconds"] > 0
    assert not any(k.startswith("eval/") for s in (1, 3) for k in m[s])
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{os.path.abspath(evaluated_run)}/mlflow.db")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    assert [p.step for p in client.get_metric_history(run.info.run_id, "eval/accuracy")] == [2, 4]


@pytest.mark.slow
def test_keep_best_keeps_the_best_evaluations_checkpoint_and_export_takes_it(evaluated_run, tmp_path):
    from ilvr.export import main as export_main
    from ilvr.training.checkpoint import read_best
    from tests.test_train import metrics

    m = metrics(evaluated_run)
    best_step = 4 if m[4]["eval/accuracy"] > m[2]["eval/accuracy"] else 2  # a tie keeps the earlier one
    best = read_best(evaluated_run)
    assert (best["step"], best["metric"], best["mode"]) == (best_step, "accuracy", "max")
    assert best["value"] == m[best_step]["eval/accuracy"]
    root = os.path.join(evaluated_run, "checkpoints")
    # keep_last=1 and save_every=0: step 4 (the end) and the best are the checkpoints left
    assert sorted(n for n in os.listdir(root) if n.startswith("step-")) == sorted({f"step-{best_step}", "step-4"})
    out = str(tmp_path / "best")
    assert export_main(["--checkpoint", evaluated_run, "--best", "--out", out]) == 0
    with open(os.path.join(out, "ilvr_settings.json"), encoding="utf-8") as f:
        assert json.load(f)["step"] == best_step


@pytest.mark.slow
def test_training_with_evaluations_is_bit_identical_to_training_without(evaluated_run, train_shards,
                                                                         tiny_processor_dir, tmp_path):
    from tests.test_train import metrics, train

    plain = str(tmp_path / "plain")
    train(plain, train_shards, tiny_processor_dir, *LORA_RUN)
    a, b = metrics(plain), metrics(evaluated_run)
    for step in (1, 2, 3, 4):  # fp32 on CPU: exactly the same numbers
        assert (b[step]["loss"], b[step]["ce"]) == (a[step]["loss"], a[step]["ce"]), step


def test_the_report_draws_the_eval_curve_when_the_run_has_eval_rows(tmp_path, monkeypatch):
    from ilvr.evaluation import report_figures
    from ilvr.evaluation.report_data import TrainingRun, curves_from_jsonl

    rows = [{"step": s, "loss": 2.0 - s / 10} for s in (1, 2, 3, 4)]
    rows[1].update({"eval/accuracy": 0.25, "eval/unparseable_rate": 0.5})
    rows[3].update({"eval/accuracy": 0.5, "eval/unparseable_rate": 0.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curves = curves_from_jsonl(str(tmp_path / "metrics.jsonl"))
    assert curves["eval/accuracy"] == [(2, 0.25), (4, 0.5)] and len(curves["loss"]) == 4
    titles: list = []
    monkeypatch.setattr(report_figures, "_png", lambda fig: titles.extend(
        ax.get_title() for ax in fig.axes if ax.get_visible()) or "data:image/png;base64,")
    report_figures.training_figure(TrainingRun("t", curves, source="x"))
    assert "evaluation during training" in titles and "loss terms" in titles
    titles.clear()
    report_figures.training_figure(TrainingRun("t", {"loss": curves["loss"]}, source="x"))  # no eval rows: no panel
    assert titles == ["loss terms"]
