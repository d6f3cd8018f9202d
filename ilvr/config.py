"""Typed run configuration: YAML files + dotted CLI overrides, validated before any worker starts.

    cfg = load_config(["configs/tiny_cpu.yaml"], ["train.lr=2e-5", "data.batch_size=4"])

Every mistake (unknown key, wrong type, bad value, missing path) raises ConfigError
with one message that names the field and says how to fix it.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any, Literal

from ilvr.config_checks import validate
# the schema is part of this module's public face: `from ilvr.config import Config, ConfigError, ...`
from ilvr.config_schema import (Config, ConfigError, DataConfig, EvalConfig, LoraConfig,  # noqa: F401
                                 LossConfig, ModelConfig, TrainConfig)
from ilvr.config_yaml import load_bounded, read_bounded, short_repr


# ----------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check `value` against the annotation `tp`, converting strings from the command line."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices and str(value) in {str(c) for c in choices}:
            value = next(c for c in choices if str(c) == str(value))
        if value not in choices:
            raise ConfigError(f"{name}={short_repr(value)} is not allowed; choose one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], name)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("()[] ").split(",")]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name} must be a list of {len(args)} values, got {short_repr(value)}")
        return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {short_repr(value)}")
        return value
    if tp in (int, float):
        if isinstance(value, str):
            try:
                value = tp(value)
            except ValueError:
                pass
        accepted = (int,) if tp is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise ConfigError(f"{name} must be {'an integer' if tp is int else 'a number'}, got {short_repr(value)}")
        return tp(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {short_repr(value)}")
        return value
    raise ConfigError(f"{name}: unsupported type {_type_name(tp)}")


# names people type from the Hugging Face Trainer, LLaMA-Factory and ms-swift, and the key that means it here
FOREIGN_NAMES = {
    "learning_rate": "train.lr", "per_device_train_batch_size": "data.batch_size",
    "num_train_epochs": "train.epochs", "save_total_limit": "train.keep_last",
    "gradient_accumulation_steps": "train.grad_accum", "save_steps": "train.save_every",
    "logging_steps": "train.log_every", "lr_scheduler_type": "train.lr_schedule", "adam_beta1": "train.betas",
    "adam_beta2": "train.betas", "model_name_or_path": "model.name_or_path",
    "dataloader_num_workers": "data.num_workers",
    "cutoff_len": "data.max_length", "max_seq_length": "data.max_length", "bf16": "model.dtype", "fp16": "model.dtype",
    "torch_dtype": "model.dtype", "vit_lr": "train.vit_lr_mult", "aligner_lr": "train.aligner_lr_mult",
    "freeze_vision_tower": "model.freeze_vit", "freeze_multi_modal_projector": "model.freeze_aligner",
    "freeze_language_model": "model.freeze_llm", "lora_rank": "model.lora.r", "lora_r": "model.lora.r",
    "lora_alpha": "model.lora.alpha", "lora_dropout": "model.lora.dropout", "lora_target": "model.lora.target_modules",
    "lora_target_modules": "model.lora.target_modules", "ema_momentum": "train.ema_decay", "batch_size": "data.batch_size",
    "image_max_pixels": "data.max_pixels", "image_min_pixels": "data.min_pixels",
}


def _dotted_keys() -> dict[str, str]:
    """field name -> section.field, over every section (a key written in the wrong section)."""
    found: dict[str, list[str]] = {}
    for section, cls in typing.get_type_hints(Config).items():
        for f in dataclasses.fields(cls):
            found.setdefault(f.name, []).append(f"{section}.{f.name}")
    return {name: where[0] for name, where in found.items() if len(where) == 1}  # seed, batch_size: ambiguous


def _unknown(name: str, known: list[str]) -> ConfigError:
    key = name.rsplit(".", 1)[-1]
    target = FOREIGN_NAMES.get(key) or _dotted_keys().get(key)
    if target and target != name:  # a name from another trainer, or a key of another section: one answer
        why = "the Hugging Face Trainer's / LLaMA-Factory's / ms-swift's name" if key in FOREIGN_NAMES \
            else f"it is a key of section {target.split('.')[0]!r}"
        return ConfigError(f"unknown config key {name!r}. Did you mean {target}? ({key}: {why}; "
                           f"docs/training.md lists every key)")
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {name!r}.{hint} Known keys here: {', '.join(known)}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in hints:
            raise _unknown(name, known)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{name} must be a mapping of {tp.__name__} fields, got {short_repr(value)}")
            kwargs[key] = _build(tp, value, f"{name}.")
        else:
            kwargs[key] = _coerce(value, tp, name)
    return cls(**kwargs)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """"train.lr=2e-5" -> {"train": {"lr": "2e-5"}} (strings are typed later, by the field)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. train.lr=2e-5")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) == 1 and parts[0].lstrip("-") in FOREIGN_NAMES.keys() | _dotted_keys().keys():
        raise _unknown(parts[0].lstrip("-"), [])
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {text!r}: the key must be section.key, e.g. data.batch_size=4")
    value: Any = raw
    if raw.strip().startswith(("[", "{")):
        value = load_bounded(raw, f"override {key.strip()}", ConfigError)
    elif raw.strip().lower() in ("null", "none", "~"):
        value = None
    for part in reversed(parts):  # model.lora.r=8 -> {"model": {"lora": {"r": "8"}}}
        value = {part: value}
    return value


def load_config(paths: "list[str] | str | None" = None, overrides: "list[str] | None" = None,
                check_paths: bool = True) -> Config:
    """Read YAML files in order (later ones win), apply dotted overrides, build and validate."""
    if isinstance(paths, str):
        paths = [paths]
    merged: dict[str, Any] = {}
    for path in paths or []:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        loaded = read_bounded(path, ConfigError) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of sections (data:, model:, ...)")
        merged = _merge(merged, loaded)
    for text in overrides or []:
        merged = _merge(merged, parse_override(text))
    _length_from_epochs(merged)
    merged = upgrade_legacy_keys(merged)
    cfg = _build(Config, merged, "")
    validate(cfg, check_paths=check_paths)
    return cfg


def upgrade_legacy_keys(raw: dict[str, Any], recorded: bool = False) -> dict[str, Any]:
    """Keys of older configs in today's names, so old recipes load and old runs resume.

    model.freeze_vision: X (tower and merger together) becomes freeze_vit and freeze_aligner (a new key
    given beside it wins: a recipe with freeze_vision and an override of freeze_aligner means the override).
    `recorded`: `raw` is a run's recorded config; one with freeze_vision was written before per-part
    freezing, when weight decay also covered biases and norms, so it records decay_biases_and_norms: true
    (a resume with today's default is then refused naming that field, instead of failing inside DeepSpeed
    on a different count of optimizer param groups).
    """
    model = raw.get("model")
    if not isinstance(model, dict) or "freeze_vision" not in model:
        return raw
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    value = out["model"].pop("freeze_vision")
    for key in ("freeze_vit", "freeze_aligner"):
        out["model"].setdefault(key, value)
    if recorded and isinstance(out.get("train"), dict):
        out["train"].setdefault("decay_biases_and_norms", True)
    return out


def _length_from_epochs(merged: dict[str, Any]) -> None:
    """A recipe that gives train.epochs (train.stage1_epochs) and no max_steps (stage1_steps) means the step
    counts come from the epochs: the defaults step aside (0) instead of clashing with them."""
    train = merged.get("train")
    if not isinstance(train, dict):
        return
    for epochs, steps in (("epochs", "max_steps"), ("stage1_epochs", "stage1_steps")):
        if epochs in train and steps not in train:
            train[steps] = 0
