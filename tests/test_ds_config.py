"""DeepSpeed config resolution: every "auto" filled from the training config, conflicts and unknowns refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ilvr.config import load_config
from ilvr.training.teacher import teacher_ds_config
from ilvr.training.ds_config import (MIN_AUTO_BUCKET, DeepSpeedConfigError, describe, load_ds_config, resolve_ds_config,
                                     save_resolved)

DS_DIR = Path(__file__).resolve().parents[1] / "ds_configs"
SHIPPED = ["zero2.json", "zero3.json", "zero3_offload.json"]


def make_cfg(*overrides: str):
    base = ["data.batch_size=4", "train.grad_accum=2", "train.lr=2e-5", "train.weight_decay=0.05",
            "train.betas=[0.9,0.95]", "train.warmup_steps=10", "train.max_steps=100", "train.max_grad_norm=0.5"]
    return load_config(None, base + list(overrides), check_paths=False)


def find_auto(tree) -> bool:
    if isinstance(tree, dict):
        return any(find_auto(v) for v in tree.values())
    if isinstance(tree, list):
        return any(find_auto(v) for v in tree)
    return tree == "auto"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_resolve_fully(name):
    out = resolve_ds_config(DS_DIR / name, make_cfg(), world_size=3, hidden_size=64, cuda=False)
    assert not find_auto(out)
    assert out["train_micro_batch_size_per_gpu"] == 4
    assert out["gradient_accumulation_steps"] == 2
    assert out["train_batch_size"] == 4 * 2 * 3
    assert out["gradient_clipping"] == 0.5
    params = out["optimizer"]["params"]
    assert params["lr"] == 2e-5 and params["betas"] == [0.9, 0.95]
    assert params["weight_decay"] == 0.05 and params["eps"] == 1e-8
    assert out["bf16"]["enabled"] is False and out["fp16"]["enabled"] is False  # auto dtype on CPU = fp32
    assert out["scheduler"] == {"type": "WarmupCosineLR", "params": {
        "total_num_steps": 100, "warmup_num_steps": 10, "warmup_min_ratio": 0.0, "cos_min_ratio": 0.0,
        "warmup_type": "linear"}}
    zero = out["zero_optimization"]
    assert zero["reduce_bucket_size"] == MIN_AUTO_BUCKET  # h^2 = 4096 is below the floor
    if zero["stage"] == 3:
        assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
        assert zero["stage3_param_persistence_threshold"] == 640


def test_dtype_auto_follows_cuda_and_explicit_dtype_wins():
    assert resolve_ds_config(DS_DIR / "zero3.json", make_cfg(), 1, 64, cuda=True)["bf16"]["enabled"] is True
    out = resolve_ds_config(DS_DIR / "zero3.json", make_cfg("model.dtype=fp16"), 1, 64, cuda=True)
    assert out["fp16"]["enabled"] is True and out["bf16"]["enabled"] is False
    # no precision sections at all: bf16 is added rather than silently training in fp32
    out = resolve_ds_config({"zero_optimization": {"stage": 2}}, make_cfg("model.dtype=bf16"), 1, 64)
    assert out["bf16"] == {"enabled": True}


def test_input_is_not_modified_and_explicit_matching_values_are_kept():
    ds = load_ds_config(DS_DIR / "zero3.json")
    ds["train_micro_batch_size_per_gpu"] = 4
    ds["zero_optimization"]["reduce_bucket_size"] = 12345
    ds["optimizer"]["params"]["eps"] = 1e-6
    before = json.dumps(ds)
    out = resolve_ds_config(ds, make_cfg(), 1, 64)
    assert json.dumps(ds) == before
    assert out["zero_optimization"]["reduce_bucket_size"] == 12345
    assert out["optimizer"]["params"]["eps"] == 1e-6


def test_conflicts_name_both_fields():
    ds = load_ds_config(DS_DIR / "zero2.json")
    ds["train_micro_batch_size_per_gpu"] = 8
    ds["gradient_clipping"] = 2.0
    with pytest.raises(DeepSpeedConfigError) as e:
        resolve_ds_config(ds, make_cfg(), 2, 64)
    msg = str(e.value)
    assert "train_micro_batch_size_per_gpu=8" in msg and "data.batch_size=4" in msg
    assert "gradient_clipping=2.0" in msg and "train.max_grad_norm=0.5" in msg


@pytest.mark.parametrize("key,value,field", [
    ("train_batch_size", 16, "world_size"),
    ("gradient_accumulation_steps", 4, "train.grad_accum"),
])
def test_batch_conflicts(key, value, field):
    ds = load_ds_config(DS_DIR / "zero3.json")
    ds[key] = value
    with pytest.raises(DeepSpeedConfigError, match=field):
        resolve_ds_config(ds, make_cfg(), 1, 64)


def test_precision_and_scheduler_conflicts():
    ds = load_ds_config(DS_DIR / "zero3.json")
    ds["bf16"]["enabled"] = True
    with pytest.raises(DeepSpeedConfigError, match="bf16.enabled=True.*model.dtype='fp32'"):
        resolve_ds_config(ds, make_cfg("model.dtype=fp32"), 1, 64)
    ds = load_ds_config(DS_DIR / "zero3.json")
    ds["scheduler"]["type"] = "WarmupDecayLR"
    with pytest.raises(DeepSpeedConfigError, match="train.lr_schedule='cosine'"):
        resolve_ds_config(ds, make_cfg(), 1, 64)


def test_unknown_auto_names_its_key_path():
    ds = load_ds_config(DS_DIR / "zero3.json")
    ds["zero_optimization"]["sub_group_size"] = "auto"
    ds["activation_checkpointing"] = {"number_checkpoints": "auto"}
    with pytest.raises(DeepSpeedConfigError) as e:
        resolve_ds_config(ds, make_cfg(), 1, 64)
    assert "zero_optimization.sub_group_size" in str(e.value)
    assert "activation_checkpointing.number_checkpoints" in str(e.value)


def test_scheduler_params_of_another_schedule():
    ds = load_ds_config(DS_DIR / "zero3.json")
    ds["scheduler"]["params"].update(warmup_min_lr="auto", warmup_max_lr="auto")  # HF-style WarmupDecayLR keys
    out = resolve_ds_config(ds, make_cfg(), 1, 64)  # under cosine they have nothing to fill: dropped
    assert "warmup_max_lr" not in out["scheduler"]["params"]
    out = resolve_ds_config(ds, make_cfg("train.lr_schedule=constant"), 1, 64)
    assert "total_num_steps" not in out["scheduler"]["params"]  # WarmupLR has no length
    assert out["scheduler"]["params"]["warmup_max_lr"] == 2e-5
    ds["scheduler"]["params"]["warmup_max_lr"] = 1e-3
    with pytest.raises(DeepSpeedConfigError, match="scheduler.params.warmup_max_lr=0.001 is not a param"):
        resolve_ds_config(ds, make_cfg(), 1, 64)


def test_hidden_size_needed_only_for_hidden_autos():
    with pytest.raises(DeepSpeedConfigError, match="reduce_bucket_size"):
        resolve_ds_config(DS_DIR / "zero3.json", make_cfg(), 1, None)
    ds = load_ds_config(DS_DIR / "zero2.json")
    ds["zero_optimization"]["reduce_bucket_size"] = 5e8
    assert resolve_ds_config(ds, make_cfg(), 1, None)["zero_optimization"]["reduce_bucket_size"] == 5e8


def test_missing_training_keys_and_sections_are_added():
    out = resolve_ds_config({"zero_optimization": {"stage": 3}}, make_cfg("train.lr_schedule=linear"), 2, 64)
    assert out["gradient_clipping"] == 0.5 and out["train_batch_size"] == 16
    assert out["optimizer"] == {"type": "AdamW", "params": {"torch_adam": True, "lr": 2e-5, "betas": [0.9, 0.95],
                                                              "weight_decay": 0.05}}
    assert out["scheduler"]["type"] == "WarmupDecayLR"
    assert out["scheduler"]["params"]["warmup_max_lr"] == 2e-5


def test_no_warmup_starts_at_full_lr():
    out = resolve_ds_config(DS_DIR / "zero3.json", make_cfg("train.warmup_steps=0"), 1, 64)
    assert out["scheduler"]["params"]["warmup_num_steps"] == 1  # DeepSpeed >= 0.19.6 rejects 0
    assert out["scheduler"]["params"]["warmup_min_ratio"] == 1.0


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 10])
def test_deepspeed_schedulers_follow_the_training_schedule(schedule, warmup):
    """Build DeepSpeed's own scheduler class from the resolved params and walk it step by step."""
    import torch
    from deepspeed.runtime import lr_schedules

    cfg = make_cfg(f"train.lr_schedule={schedule}", f"train.warmup_steps={warmup}")
    sched = resolve_ds_config(DS_DIR / "zero3.json", cfg, 1, 64)["scheduler"]
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
    s = getattr(lr_schedules, sched["type"])(opt, **sched["params"])
    lrs = []
    for _ in range(100):
        s.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert max(lrs) == pytest.approx(2e-5, rel=1e-3)  # WarmupCosineLR starts its decay one step early
    if warmup:
        assert lrs[0] == 0.0 and lrs[5] == pytest.approx(1e-5)  # linear warmup
        assert lrs[10] == pytest.approx(2e-5, rel=1e-3)
    elif schedule != "linear":  # WarmupDecayLR always warms up for 2 steps (see scheduler_params)
        assert lrs[0] == pytest.approx(2e-5)
    if schedule == "constant":
        assert lrs[-1] == pytest.approx(2e-5)
    else:
        assert lrs[-1] < 0.03 * 2e-5  # decays to 0 at max_steps
        middle = (100 + max(2, warmup)) // 2  # DeepSpeed warms up for at least 2 steps
        assert lrs[middle] == pytest.approx(1e-5, rel=0.1)  # half-way through the decay, half the lr


@pytest.mark.parametrize("name", SHIPPED)
def test_deepspeed_accepts_the_resolved_config(name):
    from deepspeed.runtime.config import DeepSpeedConfig

    out = resolve_ds_config(DS_DIR / name, make_cfg(), world_size=1, hidden_size=64)
    ds = DeepSpeedConfig(out)
    assert ds.train_batch_size == 8 and ds.gradient_clipping == 0.5
    assert ds.zero_config.reduce_bucket_size == MIN_AUTO_BUCKET
    DeepSpeedConfig(teacher_ds_config(out))


def test_teacher_config_drops_optimizer_state_only():
    out = resolve_ds_config(DS_DIR / "zero3_offload.json", make_cfg(), 1, 64)
    teacher = teacher_ds_config(out)
    assert "optimizer" not in teacher and "scheduler" not in teacher
    assert "offload_optimizer" not in teacher["zero_optimization"]
    assert teacher["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert teacher["zero_optimization"]["stage3_param_persistence_threshold"] == 640  # same partitioning
    assert "offload_optimizer" in out["zero_optimization"] and "optimizer" in out
    zero2 = resolve_ds_config(DS_DIR / "zero2.json", make_cfg(), 1, 64)
    assert teacher_ds_config(zero2)["zero_optimization"]["stage"] == 0  # ZeRO-2 refuses engines without optimizer


def test_describe_and_save_round_trip(tmp_path):
    out = resolve_ds_config(DS_DIR / "zero2.json", make_cfg(), 1, 64)
    path = save_resolved(out, str(tmp_path / "run" / "ds_config.json"))
    assert json.loads(Path(path).read_text()) == out == json.loads(describe(out))


def test_bad_files(tmp_path):
    with pytest.raises(DeepSpeedConfigError, match="does not exist"):
        load_ds_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{ not json")
    with pytest.raises(DeepSpeedConfigError, match="not valid JSON"):
        load_ds_config(tmp_path / "bad.json")


@pytest.mark.parametrize("change,message", [
    ({"zero_optimization": {"stage": "three"}}, "zero_optimization.stage='three' must be the integer 0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": "3"}}, "zero_optimization.stage='3' must be the integer"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage=4 must be the integer"),
    ({"zero_optimization": []}, "zero_optimization=[] must be a JSON object"),
    ({"steps_per_print": "x"}, "steps_per_print='x' must be an integer >= 1"),
    ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu=0 must be an integer >= 1 or \"auto\""),
    ({"zero_optimization": {"stage": 3, "reduce_bucket_size": "5e8"}}, "zero_optimization.reduce_bucket_size='5e8'"),
    ({"gradient_clipping": float("nan")}, "gradient_clipping=nan must be a finite number"),
    ({"bf16": {"enabled": "true"}}, "bf16.enabled='true' must be true or false"),
    ({"optimizer": "AdamW"}, "optimizer='AdamW' must be a JSON object"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}},
     "zero_optimization.offload_param.device='gpu' must be one of"),
])
def test_wrong_value_types_are_refused_when_the_json_is_read(tmp_path, change, message):
    ds = {**load_ds_config(DS_DIR / "zero3.json"), **change}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(DeepSpeedConfigError) as e:
        load_ds_config(path)
    assert message in str(e.value) and str(path) in str(e.value)
    with pytest.raises(DeepSpeedConfigError, match="values DeepSpeed cannot use"):
        resolve_ds_config(ds, make_cfg(), 1, 64)


def test_problems_are_listed_together_and_integral_floats_pass():
    with pytest.raises(DeepSpeedConfigError) as e:
        load_ds_config({"zero_optimization": {"stage": True, "sub_group_size": 0}, "steps_per_print": 1.5})
    text = str(e.value)
    assert "zero_optimization.stage=True" in text and "sub_group_size=0" in text and "steps_per_print=1.5" in text
    load_ds_config({"zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8, "allgather_bucket_size": 2e8}})


def test_ilvr_train_refuses_a_bad_deepspeed_json_before_any_rank_starts(tmp_path, capsys):
    """Exit code 2 from the argument check: no process group, no model (was a traceback after 73 s)."""
    import time

    from ilvr import train

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**load_ds_config(DS_DIR / "zero3.json"), "zero_optimization": {"stage": "three"}}))
    started = time.monotonic()
    rc = train.main(["--deepspeed", str(path), "--config", str(DS_DIR.parent / "configs" / "tiny_cpu.yaml"),
                     f"train.output_dir={tmp_path / 'run'}", "data.train_shards=", "data.eval_shards=",
                     "data.processor="])
    assert rc == 2 and time.monotonic() - started < 10
    assert "zero_optimization.stage='three'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_auto_reduce_bucket_is_h_squared_above_the_floor():
    # a 7B-class hidden size keeps transformers' rule; a tiny one gets the floor, not KB-sized buckets
    big = resolve_ds_config(DS_DIR / "zero3.json", make_cfg(), 1, 3584)["zero_optimization"]
    assert big["reduce_bucket_size"] == 3584 * 3584 and big["stage3_param_persistence_threshold"] == 35840
    small = resolve_ds_config(DS_DIR / "zero3.json", make_cfg(), 1, 128)["zero_optimization"]
    assert small["reduce_bucket_size"] == MIN_AUTO_BUCKET
    assert small["stage3_prefetch_bucket_size"] == int(0.9 * 128 ** 2)  # the prefetch bucket keeps the rule
