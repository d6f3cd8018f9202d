"""What DeepSpeed trains: the student engine and its momentum teacher, built from a Config.

    student = build_student(cfg, ds_config, processor, latent_ids, wants_teacher=True)
    teacher = build_teacher(cfg, ds_config, student)

Under ZeRO-3 both models are built partitioned (zero.Init, same seed on every rank). With LoRA the model
is built whole and partitioned by deepspeed.initialize after PEFT injected the adapters (PEFT's ZeRO-3 path
for the latent token rows is CUDA-only); the teacher is then an EMA adapter beside the student's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ilvr.config import Config, ModelConfig

log = logging.getLogger(__name__)


def is_zero3(ds_config: dict) -> bool:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3


def model_width(model_cfg: ModelConfig) -> int:
    """The LM's hidden size, for the ds config's hidden-size 'auto' values (read before any model exists)."""
    if model_cfg.name_or_path == "tiny":
        from ilvr.model.build import TinySize

        return TinySize.from_config(model_cfg).hidden
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_cfg.name_or_path, local_files_only=True)
    return config.text_config.hidden_size if hasattr(config, "text_config") else config.hidden_size


def resolved_ds_config(ds_config_arg: "str | dict", cfg: Config, world_size: int) -> dict:
    """The DeepSpeed config with every 'auto' filled from `cfg`, logged once resolved."""
    from ilvr.training.ds_config import describe, resolve_ds_config

    resolved = resolve_ds_config(ds_config_arg, cfg, world_size, model_width(cfg.model))
    if cfg.train.comm_stats:  # DeepSpeed's comms logger feeds comm/* (ilvr/training/comm_stats.py)
        resolved["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False, "debug": False}
    log.info("DeepSpeed config (all 'auto' values resolved):\n%s", describe(resolved))
    return resolved


@dataclass
class Student:
    """The student's DeepSpeed engine; `peft` is the PeftModel with LoRA (for adapter switching), else None.
    `hf_ds` keeps transformers' HfDeepSpeedConfig alive: while it lives, from_pretrained partitions as it loads."""

    engine: Any
    peft: Any = None
    hf_ds: Any = None


def _new_model(cfg: Config, ds_config: dict, processor, latent_ids, wants_teacher: bool):
    """(model, peft, hf_ds): the model, built partitioned under zero.Init for ZeRO-3 (same seed on every rank)."""
    from transformers.integrations import HfDeepSpeedConfig

    from ilvr.model.build import build_model

    lora = cfg.model.lora.r > 0
    hf_ds = None if lora else HfDeepSpeedConfig(ds_config)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, processor.tokenizer, processor.image_processor, seed=cfg.train.seed,
                        zero3_config=ds_config if is_zero3(ds_config) and not lora else None)
    peft = None
    if lora:  # adapters injected in place; the PeftModel kept for adapter switching
        from ilvr.model.lora import apply_lora

        peft = apply_lora(model, cfg.model.lora, latent_ids, teacher=wants_teacher)
        hf_ds = HfDeepSpeedConfig(ds_config)
    return model, peft, hf_ds


def build_student(cfg: Config, ds_config: dict, processor, latent_ids, wants_teacher: bool) -> Student:
    """The student wrapped by deepspeed.initialize, with a learning rate per part (param_groups.py)."""
    import deepspeed

    from ilvr.training.param_groups import param_groups, scheduler_factory

    model, peft, hf_ds = _new_model(cfg, ds_config, processor, latent_ids, wants_teacher)
    model.train()
    groups = param_groups(model, cfg.train)  # lr per part, no weight decay on biases and norms
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config,
                                      lr_scheduler=scheduler_factory(ds_config))
    if cfg.model.lora.r > 0 and is_zero3(ds_config):
        from ilvr.model.lora import register_token_params

        register_token_params(engine.module)
    return Student(engine, peft, hf_ds)


def build_teacher(cfg: Config, ds_config: dict, student: Student, processor, latent_ids):
    """The frozen momentum teacher: a second model partitioned like the student (teacher_ds_config), or with
    LoRA an EMA adapter over the student's frozen base."""
    from ilvr.training.teacher import AdapterTeacher, MomentumTeacher, teacher_ds_config

    if cfg.model.lora.r > 0:
        teacher = AdapterTeacher(student.engine, student.peft, decay=cfg.train.ema_decay)
    else:
        config = teacher_ds_config(ds_config)
        model, _, student.hf_ds = _new_model(cfg, config, processor, latent_ids, wants_teacher=True)
        teacher = MomentumTeacher(student.engine, model, config, decay=cfg.train.ema_decay)
    log.info("momentum teacher: %.3f MB on this rank (%s)", teacher.memory_bytes() / 2**20,
             "an EMA adapter beside the student's" if cfg.model.lora.r > 0 else "a second model")
    return teacher
