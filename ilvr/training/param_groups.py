"""The optimizer's parameter groups: a learning rate per model part, no weight decay on biases and norms.

    groups = param_groups(model, cfg.train)           # deepspeed.initialize(model_parameters=groups, ...)
    lr_scheduler = scheduler_factory(ds_config)       # deepspeed.initialize(lr_scheduler=lr_scheduler, ...)

Each trainable part (ilvr/model/parts.py) gets train.lr times its multiplier (train.vit_lr_mult,
train.aligner_lr_mult; the LM 1), split into a group with train.weight_decay and one without:
the 1-D parameters, i.e. the biases and the norm gains, are not decayed (the HF Trainer's
default; decaying a norm gain pulls it to zero). train.decay_biases_and_norms=true keeps one
group per part, as runs from before this option had.

DeepSpeed's WarmupLR / WarmupDecayLR set every group to one warmup_max_lr, which would undo the
multipliers; the factory builds the configured scheduler with per-group lrs instead (WarmupCosineLR
already scales each group's own lr). DeepSpeed takes it through deepspeed.initialize's public
lr_scheduler argument and checkpoints it like its own.
"""
from __future__ import annotations

from typing import Any, Callable

from ilvr.model.parts import PARTS, part_of


def _shape(p) -> tuple:
    return tuple(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partitioned parameter shows shape (0,)


def lr_scales(train_cfg) -> dict[str, float]:
    return {"llm": 1.0, "aligner": train_cfg.aligner_lr_mult, "vit": train_cfg.vit_lr_mult}


def param_groups(model, train_cfg) -> list[dict[str, Any]]:
    """The trainable parameters of `model` in optimizer groups (named "<part>" / "<part>/no_decay"), in a fixed
    order: every rank, and a resumed run, builds the same groups."""
    scales = lr_scales(train_cfg)
    split = not train_cfg.decay_biases_and_norms
    buckets: dict[tuple[str, bool], list] = {(part, decay): [] for part in PARTS for decay in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            buckets[(part_of(name), not split or len(_shape(p)) > 1)].append(p)
    groups = []
    for (part, decay), params in buckets.items():
        if params:
            groups.append({"params": params, "name": part if decay else f"{part}/no_decay",
                           "lr": train_cfg.lr * scales[part], "lr_scale": scales[part],
                           "weight_decay": train_cfg.weight_decay if decay else 0.0})
    return groups


def scheduler_factory(ds_config: dict) -> "Callable | None":
    """A callable optimizer -> the DeepSpeed scheduler `ds_config` names, its lrs scaled per group
    (group["lr_scale"]); None when the config has no scheduler."""
    sched = ds_config.get("scheduler") or {}
    kind, params = sched.get("type"), dict(sched.get("params") or {})
    if not kind:
        return None

    def build(optimizer):
        from deepspeed.runtime import lr_schedules

        scales = [g.get("lr_scale", 1.0) for g in optimizer.param_groups]
        kwargs = {k: [v * s for s in scales] if k in ("warmup_min_lr", "warmup_max_lr") and isinstance(v, (int, float))
                  else v for k, v in params.items()}
        return getattr(lr_schedules, kind)(optimizer, **kwargs)

    return build
