"""LoRA (model.lora.*, ilvr/model/lora.py): adapters on the LM through PEFT, the latent token rows trained in full,
a momentum teacher that shares the frozen base (EMA over the adapter only), a merged stock export."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ilvr.config import LoraConfig, load_config


def test_lora_targets_the_lms_linear_layers_and_trains_adapters_and_latent_rows(tiny, tiny_model_factory):
    from ilvr.model.lora import apply_lora
    from ilvr.model.parts import part_of

    processor, latent_ids = tiny
    model = tiny_model_factory()
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8), latent_ids, teacher=True)
    assert peft_model.get_base_model() is model  # injected in place: the stock class keeps its forward
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(part_of(n) == "llm" for n in trainable)
    assert all(".default" in n for n in trainable)  # the teacher's adapter is frozen
    assert any("lora_A.default" in n for n in trainable)
    assert any("embed_tokens.token_adapter.trainable_tokens_delta.default" in n for n in trainable)
    assert any("lm_head.token_adapter.trainable_tokens_delta.default" in n for n in trainable)  # untied
    assert not any(".visual." in n and "lora" in n for n, _ in model.named_parameters())  # never the tower
    assert not any(n.startswith("lm_head.lora") for n, _ in model.named_parameters())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) < 0.2 * frozen
    only_q = apply_lora(tiny_model_factory(), LoraConfig(r=4, target_modules="q_proj"), latent_ids)
    assert {n.split(".")[-4] for n, _ in only_q.get_base_model().named_parameters() if "lora_A" in n} == {"q_proj"}


@pytest.mark.parametrize("overrides, message", [
    (["model.lora.r=8", "model.freeze_llm=true"], "model.freeze_llm=true freezes"),
    (["model.lora.r=8", "model.freeze_vit=false"], "not supported: the teacher shares the frozen base"),
    (["model.lora.r=8", "model.lora.dropout=1"], "model.lora.dropout=1.0 must be in [0, 1)"),
    (["model.lora.r=-1"], "model.lora.r=-1 must be >= 0"),
])
def test_lora_settings_are_checked(overrides, message):
    from ilvr.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(None, overrides, check_paths=False)
    assert message in str(e.value)


def test_lora_keys_load_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text("model:\n  lora:\n    r: 8\n    alpha: 16\n")
    cfg = load_config(str(path), ["model.lora.dropout=0.05"], check_paths=False)
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.dropout) == (8, 16.0, 0.05)
    assert cfg.flat()["model.lora.r"] == 8
    assert load_config(None, check_paths=False).model.lora.r == 0  # off by default


def test_merging_keeps_the_adapted_models_outputs(tiny, tiny_model_factory):
    from ilvr.model.lora import apply_lora, merged_model

    _, latent_ids = tiny
    model = tiny_model_factory()
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8), latent_ids, teacher=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.default" in name or "trainable_tokens_delta.default" in name:
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.tensor([[5, 9, latent_ids.start, latent_ids.pad, 11]])
    before = model(input_ids=ids).logits
    stock = merged_model(peft_model)
    assert not any("lora" in n or "token_adapter" in n for n, _ in stock.named_parameters())
    torch.testing.assert_close(stock(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("ds", ["zero3", "zero2"])
def test_lora_trains_both_stages_with_an_adapter_teacher_and_exports_a_stock_model(tmp_path, tiny_processor_dir, ds):
    """2 ranks: model.lora.r=8 through stage 1 (adapter teacher: no second model) and stage 2; ilvr-export merges
    the adapter into a model stock transformers loads without peft, and writes the adapter alone on request."""
    from tests.factories import synthetic_vsp_shards
    from tests.test_train import metrics, train

    shards = synthetic_vsp_shards(str(tmp_path / "shards"), 8, seed=7)
    out = str(tmp_path / "run")
    proc = train(out, shards, tiny_processor_dir, "train.max_steps=4", "train.stage1_steps=2", "train.lr=1e-3",
                 "model.lora.r=8", ds=ds)
    m = metrics(out)
    assert [m[s]["stage"] for s in (1, 2, 3, 4)] == [1.0, 1.0, 2.0, 2.0]
    assert all(m[s]["ema_ms"] > 0 for s in (1, 2))
    log = open(os.path.join(out, "train.log"), encoding="utf-8").read()
    assert "an EMA adapter beside the student's" in log, proc.stdout[-2000:]
    mb = float(log.split("momentum teacher: ")[1].split(" MB")[0])
    assert mb < 0.5  # the adapter (twice: weights and fp32 EMA), not a model (the full teacher: 0.65 MB per rank)

    from ilvr.export import main as export_main

    exported, adapter = str(tmp_path / "exported"), str(tmp_path / "adapter")
    assert export_main(["--checkpoint", out, "--out", exported, "--adapter-out", adapter]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(adapter))
    check = ("import sys; from transformers import AutoModelForImageTextToText as A; "
             f"m = A.from_pretrained({exported!r}, local_files_only=True); assert 'peft' not in sys.modules; "
             "print(any('lora' in n for n, _ in m.named_parameters()))")
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "False", loaded.stderr[-3000:]
    with open(os.path.join(exported, "ilvr_settings.json"), encoding="utf-8") as f:
        assert json.load(f)["step"] == 4


LORA_RUN = ("train.max_steps=4", "train.stage1_steps=2", "train.lr=1e-3", "train.warmup_steps=1",
            "train.save_every=0", "model.lora.r=8")


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_processor_dir) -> dict:
    """Trained once for both resume tests: a 4-step LoRA run (stage 1 to step 2) straight through on 2 ranks, and
    the same run stopped after step 1 on 2 ranks (each test resumes its own copy: a run dir, MLflow store
    included, may be copied)."""
    from tests.factories import synthetic_vsp_shards
    from tests.test_train import metrics, train

    root = tmp_path_factory.mktemp("lora_resume")
    shards = synthetic_vsp_shards(str(root / "shards"), 8, seed=7)
    straight, stopped = str(root / "straight"), str(root / "stopped")
    train(straight, shards, tiny_processor_dir, *LORA_RUN)
    train(stopped, shards, tiny_processor_dir, *LORA_RUN, "train.stop_after=1")
    assert sorted(metrics(stopped)) == [1]
    return {"shards": shards, "straight": metrics(straight), "stopped": stopped}


def _resumed(lora_runs: dict, tmp_path, processor_dir: str, resume_ranks: int):
    """A copy of the stopped run resumed (--resume auto) on `resume_ranks`: (straight metrics, resumed metrics,
    resumed dir, the resuming process)."""
    import shutil

    from tests.test_train import metrics, train

    split = str(tmp_path / "split")
    shutil.copytree(lora_runs["stopped"], split)
    resumed = train(split, lora_runs["shards"], processor_dir, *LORA_RUN, nproc=resume_ranks)
    b = metrics(split)
    assert sorted(b) == [1, 2, 3, 4] and [b[s]["stage"] for s in (2, 3)] == [1.0, 2.0]
    return lora_runs["straight"], b, split, resumed


@pytest.mark.slow
def test_a_lora_run_resumes_under_zero3_as_if_never_stopped(lora_runs, tmp_path, tiny_processor_dir):
    """2 ranks, model.lora.r=8: stopped after step 1 (stage 1: the adapter teacher's EMA, the adapters' and latent
    rows' optimizer state) and resumed, the losses of steps 2-4 (stage 1, then stage 2) are exactly those of the
    run that was never stopped. Not yet with adapter dropout: with model.lora.dropout=0.1 step 4 differed by 5e-5
    (steps 1-3 equal: the masks drawn at step 3 of the resumed run differ; docs/training.md "LoRA")."""
    a, b, _, _ = _resumed(lora_runs, tmp_path, tiny_processor_dir, resume_ranks=2)
    for step in (1, 2, 3, 4):  # fp32 on CPU: exactly the same numbers
        assert (b[step]["loss"], b[step]["ce"]) == (a[step]["loss"], a[step]["ce"]), (step, a[step], b[step])


@pytest.mark.slow
def test_a_lora_run_saved_on_two_ranks_resumes_on_one(lora_runs, tmp_path, tiny_processor_dir):
    """Elastic resume with LoRA: stopped after step 1 on 2 ranks, resumed on 1 (the adapters, the latent rows, their
    optimizer state and the adapter teacher's EMA buffers converted and re-partitioned), the run finishes both
    stages with losses within the elastic tests' tolerance of the run that was never stopped (the batches of the
    later steps differ: one rank draws them) and exactly equal at step 1."""
    from tests.test_elastic import LOSS_TOLERANCE

    a, b, split, resumed = _resumed(lora_runs, tmp_path, tiny_processor_dir, resume_ranks=1)
    log = open(os.path.join(split, "train.log"), encoding="utf-8").read()
    assert "elastic resume from 2 to 1 ranks" in log, resumed.stdout[-2000:] + log[-3000:]
    assert b[1]["loss"] == a[1]["loss"]
    for step in (2, 3, 4):
        assert abs(b[step]["loss"] - a[step]["loss"]) < LOSS_TOLERANCE, (step, a[step], b[step])
    assert os.path.isfile(os.path.join(split, "finished.json"))
