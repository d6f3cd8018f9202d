"""Typed config: YAML + dotted overrides, and one clear message per mistake naming the field."""
from __future__ import annotations

import pytest

from ilvr.config import Config, ConfigError, load_config, parse_override
from tests.conftest import REPO

TINY = str(REPO / "configs" / "tiny_cpu.yaml")


def test_yaml_and_overrides_are_typed():
    cfg = load_config(TINY, ["train.lr=2e-5", "data.batch_size=8", "data.packing=true", "train.stage=1",
                             "train.betas=[0.9, 0.95]", "model.attn_implementation=sdpa"], check_paths=False)
    assert isinstance(cfg, Config)
    assert cfg.train.lr == 2e-5 and isinstance(cfg.train.lr, float)
    assert cfg.data.batch_size == 8 and cfg.data.packing is True
    assert cfg.train.betas == (0.9, 0.95)
    assert cfg.model.attn_implementation == "sdpa"
    assert cfg.model.latent_size == 4  # from the YAML


def test_later_files_win(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("train:\n  max_steps: 70\n")
    cfg = load_config([TINY, str(extra)], check_paths=False)
    assert cfg.train.max_steps == 70 and cfg.train.lr == 1e-3


@pytest.mark.parametrize("override,message", [
    ("data.batchsize=4", "unknown config key 'data.batchsize'. Did you mean 'batch_size'?"),
    ("datta.batch_size=4", "unknown config key 'datta'"),
    ("data.batch_size=four", "data.batch_size must be an integer, got 'four'"),
    ("data.batch_size=0", "data.batch_size=0 must be >= 1"),
    ("model.latent_size=0", "model.latent_size=0: K must be >= 1"),
    ("data.mode=random", "data.mode='random' is not allowed; choose one of ['exact', 'resampled']"),
    ("loss.coverage_p=1.5", "loss.coverage_p=1.5 must be in (0, 1]"),
    ("train.lr=-1", "train.lr=-1.0 must be > 0"),
    ("data.packing=maybe", "data.packing must be true or false"),
    ("data.packing=true", "data.packing=true with train.stage='1+2': stage 2 feeds latents through a KV cache"),
    ("train.betas=[0.9]", "train.betas must be a list of 2 values"),
    ("train.stage1_steps=500", "train.stage1_steps=500 must be between 0 and train.max_steps=30"),
    ("lr=1", "Did you mean train.lr?"),  # no section: the key it belongs to (test_config_names.py)
    ("nosuchkey=1", "the key must be section.key"),
    ("train.epochs=2", "train.epochs=2 and train.max_steps=30 both set the run's length"),
    ("train.stage1_epochs=1", "train.stage1_epochs=1 and train.stage1_steps=20 both set stage 1's length"),
    ("train.max_steps=0", "train.max_steps=0 must be >= 1 (or 0 with train.epochs > 0"),
    ("train.epochs=-1", "train.epochs=-1.0 and train.stage1_epochs=0.0 must be >= 0"),
    ("model.tiny_heads=3", "model.tiny_hidden=64 / model.tiny_heads=3 must give an even head size"),
    ("model.tiny_vision_hidden=40", "model.tiny_vision_hidden=40 must be a multiple of 16"),
    ("loss.targets=mean", "loss.targets='mean' is not allowed; choose one of ['teacher', 'pooled']"),
])
def test_each_mistake_names_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override], check_paths=False)
    assert message in str(e.value)


def test_missing_shards_and_processor_are_caught_before_any_worker(tmp_path):
    with pytest.raises(ConfigError, match=r"data.train_shards: shard .*missing-000000.tar.* does not exist"):
        load_config(TINY, [f"data.train_shards={tmp_path}/missing-{{000000..000003}}.tar", "data.eval_shards=",
                           "data.processor="])
    with pytest.raises(ConfigError, match="data.processor=.* is not a directory"):
        load_config(TINY, ["data.train_shards=", "data.eval_shards=", f"data.processor={tmp_path}/nope"])


def test_a_model_dir_that_is_no_supported_model_is_caught_before_any_worker(tmp_path):
    import json

    def check(message: str):
        with pytest.raises(ConfigError, match=message):
            load_config(TINY, ["data.train_shards=", "data.eval_shards=", "data.processor=",
                               f"model.name_or_path={model}"])

    model = tmp_path / "model"
    check("is not a directory")
    model.mkdir()
    check("has no config.json: it is not a Hugging Face model directory")
    (model / "config.json").write_text("[1, 2]")
    check("config.json is not a JSON object")
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    check("is a 'llama' model; ILVR-train trains qwen2_5_vl and qwen2_vl")
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    check("has a config.json but no [*].safetensors weights")
    (model / "pytorch_model.bin").write_bytes(b"pickle")
    check("no [*].safetensors weights; ILVR-train loads safetensors only")
    (model / "model.safetensors").write_bytes(b"")
    cfg = load_config(TINY, ["data.train_shards=", "data.eval_shards=", "data.processor=", f"model.name_or_path={model}"])
    assert cfg.model.name_or_path == str(model)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_config(str(bad))
    bad.write_text("data: 3\n")
    with pytest.raises(ConfigError, match="data must be a mapping"):
        load_config(str(bad))


def test_flat_and_save_round_trip(tmp_path):
    cfg = load_config(TINY, ["train.lr=3e-4"], check_paths=False)
    flat = cfg.flat()
    assert flat["train.lr"] == 3e-4 and flat["model.latent_size"] == 4
    path = tmp_path / "resolved.yaml"
    cfg.save(str(path))
    assert load_config(str(path), check_paths=False) == cfg


def test_override_parsing():
    assert parse_override("train.lr=2e-5") == {"train": {"lr": "2e-5"}}
    assert parse_override("data.train_shards=a,b") == {"data": {"train_shards": "a,b"}}
    assert parse_override("eval.shards=null") == {"eval": {"shards": None}}


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "configs").glob("qwen25vl_*.yaml")))
def test_reference_recipes_load_with_the_reference_constants(recipe):
    cfg = load_config(str(REPO / "configs" / recipe), check_paths=False)
    assert (cfg.model.latent_size, cfg.train.ema_decay, cfg.loss.coverage_p, cfg.loss.max_candidates) == (8, 0.999, 0.9, 256)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.data.batch_size, cfg.train.grad_accum) == (1e-5, 0.01, 1, 8)
    assert cfg.model.dtype == "bf16" and cfg.data.max_length == 32768 and cfg.eval.max_new_tokens == 4096
    # the whole method, not stage 1 only; selection that adapts (score_norm), not the reference's flat softmax
    assert cfg.train.stage == "1+2" and (cfg.train.epochs, cfg.train.stage1_epochs) == (15, 10)
    assert (cfg.train.max_steps, cfg.train.stage1_steps) == (0, 0)  # resolved from the epochs at start-up
    assert cfg.loss.score_norm == "standardize"


@pytest.mark.parametrize("override,message", [
    ("train.lr=inf", "train.lr=inf: must be a finite number"),
    ("train.lr=nan", "train.lr=nan: must be a finite number"),
    ("loss.temperature=-inf", "loss.temperature=-inf: must be a finite number"),
    ("train.betas=[0.9, nan]", "train.betas=(0.9, nan): must be a finite number"),
    ("train.output_dir=/", "train.output_dir='/' (-> /) is /, the home directory"),
    ("train.output_dir=..", "train.output_dir='..'"),
    ("train.output_dir=", "train.output_dir is empty"),
])
def test_careless_values_are_refused(override, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override], check_paths=False)
    assert message in str(e.value)


def test_output_dir_is_never_home_a_parent_of_here_or_the_project(tmp_path, monkeypatch):
    here = tmp_path / "a" / "b"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for bad in (str(tmp_path / "home"), str(tmp_path), str(tmp_path / "a"), str(REPO), str(REPO.parent)):
        with pytest.raises(ConfigError, match="a run writes and prunes files there"):
            load_config(TINY, [f"train.output_dir={bad}"], check_paths=False)
    for good in (".", "runs/x", str(tmp_path / "elsewhere"), str(REPO / "runs" / "x")):
        load_config(TINY, [f"train.output_dir={good}"], check_paths=False)


def test_a_recipe_in_epochs_leaves_the_steps_to_start_up(tmp_path):
    recipe = tmp_path / "epochs.yaml"
    recipe.write_text("train:\n  stage: '1+2'\n  epochs: 3\n  stage1_epochs: 2\n")
    cfg = load_config(str(recipe), check_paths=False)
    assert (cfg.train.epochs, cfg.train.stage1_epochs, cfg.train.max_steps, cfg.train.stage1_steps) == (3, 2, 0, 0)
    with pytest.raises(ConfigError, match="train.stage1_epochs=4 must be <= train.epochs=3"):
        load_config(str(recipe), ["train.stage1_epochs=4"], check_paths=False)
    with pytest.raises(ConfigError, match=r"train.epochs=3 and train.max_steps=10 both set"):
        load_config(str(recipe), ["train.max_steps=10"], check_paths=False)


def test_processor_must_be_a_processor_directory(tmp_path, tiny_processor_dir):
    empty = tmp_path / "not_a_processor"
    empty.mkdir()
    (empty / "config.json").write_text("{}")  # e.g. a model dir without its tokenizer
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["data.train_shards=", "data.eval_shards=", f"data.processor={empty}"])
    message = str(e.value)
    assert f"data.processor='{empty}' is not a processor directory" in message
    assert "tokenizer_config.json" in message and "preprocessor_config.json or processor_config.json" in message
    assert "checkpoints/step-N/processor" in message  # the fix
    cfg = load_config(TINY, ["data.train_shards=", "data.eval_shards=", f"data.processor={tiny_processor_dir}"])
    assert cfg.data.processor == tiny_processor_dir


def test_the_quickstart_recipe_loads_with_what_makes_a_tiny_model_learn():
    cfg = load_config(str(REPO / "configs" / "quickstart.yaml"), check_paths=False)
    m = cfg.model
    assert (m.name_or_path, m.freeze_vit, m.freeze_aligner, m.tiny_rope_theta) == ("tiny", True, True, 10.0)
    assert cfg.train.lr <= 3e-4 and cfg.train.stage == "1+2" and 0 < cfg.train.stage1_steps < cfg.train.max_steps
