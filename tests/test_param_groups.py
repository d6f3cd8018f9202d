"""Per-part freezing (model.freeze_vit / freeze_aligner / freeze_llm), lr multipliers and no weight decay on
biases and norms (ilvr/model/parts.py, ilvr/training/param_groups.py)."""
from __future__ import annotations

import pytest
import torch

from ilvr.config import ModelConfig, TrainConfig, load_config
from ilvr.model.parts import freeze_parts, frozen_parts, part_of
from ilvr.training.param_groups import param_groups, scheduler_factory


def test_part_of_names_the_three_parts_also_under_a_peft_prefix():
    assert part_of("model.visual.blocks.0.attn.qkv.weight") == "vit"
    assert part_of("model.visual.patch_embed.proj.weight") == "vit"
    assert part_of("model.visual.merger.mlp.0.weight") == "aligner"
    assert part_of("model.language_model.layers.0.mlp.up_proj.weight") == "llm"
    assert part_of("lm_head.weight") == "llm"
    assert part_of("base_model.model.model.visual.merger.ln_q.weight") == "aligner"


@pytest.mark.parametrize("flags, trainable", [
    ((True, True, False), {"llm"}),
    ((False, True, False), {"vit", "llm"}),
    ((True, False, True), {"aligner"}),
    ((False, False, False), {"vit", "aligner", "llm"}),
])
def test_freezing_per_part(tiny_model_factory, flags, trainable):
    model = tiny_model_factory()
    cfg = ModelConfig(freeze_vit=flags[0], freeze_aligner=flags[1], freeze_llm=flags[2])
    freeze_parts(model, frozen_parts(cfg))
    parts = {part_of(n) for n, p in model.named_parameters() if p.requires_grad}
    assert parts == trainable
    assert {part_of(n) for n, _ in model.named_parameters()} == {"vit", "aligner", "llm"}


def test_groups_give_each_part_its_lr_and_no_decay_to_biases_and_norms(tiny_model_factory):
    model = tiny_model_factory()
    freeze_parts(model, frozen_parts(ModelConfig(freeze_vit=False, freeze_aligner=False)))
    t = TrainConfig(lr=1e-3, weight_decay=0.1, vit_lr_mult=0.1, aligner_lr_mult=0.5)
    groups = param_groups(model, t)
    assert [g["name"] for g in groups] == ["llm", "llm/no_decay", "aligner", "aligner/no_decay", "vit",
                                           "vit/no_decay"]
    by_name = {g["name"]: g for g in groups}
    assert by_name["llm"]["lr"] == 1e-3 and by_name["vit"]["lr"] == pytest.approx(1e-4)
    assert by_name["aligner/no_decay"]["lr"] == pytest.approx(5e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["name"].endswith("/no_decay") for p in g["params"]}
    assert all(g["weight_decay"] == (0.0 if g["name"].endswith("/no_decay") else 0.1) for g in groups)
    assert "model.language_model.norm.weight" in no_decay
    assert any(n.endswith("self_attn.q_proj.bias") for n in no_decay)
    assert any(".visual.merger.ln_q." in n for n in no_decay)
    assert not any(n.endswith(("proj.weight", "embed_tokens.weight")) for n in no_decay)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
    # the old behaviour, for runs from before: one group per part, all decayed
    old = param_groups(model, TrainConfig(lr=1e-3, weight_decay=0.1, decay_biases_and_norms=True))
    assert [g["name"] for g in old] == ["llm", "aligner", "vit"] and all(g["weight_decay"] == 0.1 for g in old)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_scheduler_keeps_the_multipliers(schedule):
    from ilvr.training.ds_config import resolve_ds_config

    cfg = load_config(None, [f"train.lr_schedule={schedule}", "train.lr=1e-3", "train.warmup_steps=2",
                             "train.max_steps=10", "model.freeze_vit=false", "train.vit_lr_mult=0.1"],
                      check_paths=False)
    ds = resolve_ds_config("ds_configs/zero2.json", cfg, 1, 64, cuda=False)
    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([{"params": [a], "lr": 1e-3, "lr_scale": 1.0},
                             {"params": [b], "lr": 1e-4, "lr_scale": 0.1}])
    sched = scheduler_factory(ds)(opt)
    for _ in range(4):
        opt.step()
        sched.step()
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs[1] == pytest.approx(0.1 * lrs[0]), (schedule, lrs)
    assert lrs[0] > 1e-4


def test_the_older_freeze_vision_key_sets_both_vision_parts_and_new_keys_win():
    cfg = load_config(None, ["model.freeze_vision=false"], check_paths=False)
    assert (cfg.model.freeze_vit, cfg.model.freeze_aligner, cfg.model.freeze_llm) == (False, False, False)
    cfg = load_config(None, ["model.freeze_vision=true", "model.freeze_aligner=false"], check_paths=False)
    assert (cfg.model.freeze_vit, cfg.model.freeze_aligner) == (True, False)
    assert "freeze_vision" not in cfg.to_dict()["model"]  # recorded in today's names


def test_an_old_runs_record_resumes_with_its_settings_named():
    """A config recorded before per-part freezing (freeze_vision, weight decay on everything): the same
    recipe matches it on the freezing; the weight-decay change is named (not a DeepSpeed load failure)."""
    from ilvr.training.run_dir import config_changes

    given = load_config(None, ["model.freeze_vision=false"], check_paths=False).to_dict()
    old = {"model": {k: v for k, v in given["model"].items() if not k.startswith("freeze_")}, "train": {}}
    old["model"]["freeze_vision"] = False
    assert config_changes(old, given) == {"train.decay_biases_and_norms": [True, False]}
    given["train"]["decay_biases_and_norms"] = True
    assert config_changes(old, given) == {}


@pytest.mark.parametrize("overrides, message", [
    (["model.freeze_llm=true"], "nothing would train; set model.freeze_llm=false"),
    (["train.vit_lr_mult=0.1"], "train.vit_lr_mult=0.1 has no effect while model.freeze_vit=true"),
    (["model.freeze_aligner=false", "train.aligner_lr_mult=0"], "train.aligner_lr_mult=0.0 must be > 0"),
])
def test_part_settings_are_checked(overrides, message):
    from ilvr.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, overrides, check_paths=False)


@pytest.mark.slow
def test_training_gives_the_vision_tower_its_own_lr(two_stage_run):
    """ZeRO-3 on 2 ranks: the tower trains at train.lr * train.vit_lr_mult through the warmup and decay.
    (In the same run to save CPU: data.max_pixels reaches the checkpoint's processor, and the MLflow run is
    tagged ilvr.kind=train. The run is conftest's two_stage_run, which tests/test_evaluation.py also checks.)"""
    import os

    from tests.test_train import metrics

    out = two_stage_run["dir"]
    m = metrics(out)
    assert sorted(m) == [1, 2, 3, 4] and m[2]["lr"] > 0
    assert all(m[s]["lr/vit"] == pytest.approx(0.25 * m[s]["lr"]) for s in m)
    assert "lr/aligner" not in m[1]  # frozen: no group
    from data_pipeline.tiny_processor import load_processor

    saved, _ = load_processor(os.path.join(out, "checkpoints", "step-4", "processor"))
    assert saved.image_processor.size.longest_edge == 22500
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{os.path.abspath(out)}/mlflow.db")
    # the run's store also holds the evaluations other tests log beside it (tagged ilvr.kind=eval)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                filter_string="tags.`ilvr.kind` = 'train'")
    assert run.info.status == "FINISHED" and run.data.tags["ilvr.kind"] == "train"
