"""The run's length in steps from `train.epochs` / `train.stage1_epochs`, resolved at start-up.

    note = resolve_epochs(cfg, world_size=8)   # cfg.train.max_steps (and stage1_steps) now set; None: nothing to do

Users think in epochs; the trainer counts optimizer steps. One step takes
`world_size x data.batch_size x train.grad_accum` samples, and an epoch is what the streaming
loader calls one (data_pipeline.loader.samples_per_worker: the manifest's sample count split
over ranks and workers, rounded up to whole batches; resampled mode: data.samples_per_epoch per
rank). The resolved config is a step config (epochs set back to 0), so config.resolved.yaml and
the checkpoints record the steps the run really takes, and reload as a valid recipe.
"""
from __future__ import annotations

import math

from ilvr.config import Config, ConfigError


def batches_per_epoch(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro-batches per rank per epoch, samples in data.train_shards), as the training loader plans them."""
    from data_pipeline.loader import samples_per_worker
    from data_pipeline.shards import expand_shards, shard_sample_counts

    d = cfg.data
    if not d.train_shards:
        raise ConfigError("train.epochs needs data.train_shards (the epoch is a pass over them)")
    total = sum(shard_sample_counts(expand_shards(d.train_shards, must_exist=True)))
    if total == 0:
        raise ConfigError(f"data.train_shards={d.train_shards!r} holds no samples: train.epochs cannot be resolved")
    workers = max(1, d.num_workers)
    per_worker = samples_per_worker(d.mode, total, world_size, workers, d.batch_size, d.samples_per_epoch)
    return workers * per_worker // d.batch_size, total


def steps_for(epochs: float, batches: int, grad_accum: int) -> int:
    """Optimizer steps that cover `epochs` passes (a started step counts: at least 1)."""
    return max(1, math.ceil(epochs * batches / grad_accum - 1e-9))


def steps_after(epochs: float, resumed: "tuple[int, int]", cfg: Config, batches: int) -> int:
    """The step at which `epochs` are done for a run resumed at step s of a run on another world size w:
    s steps of w ranks covered s / (steps per epoch on w) epochs; the rest is counted on this world size."""
    step, old_world = resumed
    old_batches, _ = batches_per_epoch(cfg, old_world)
    done = step * cfg.train.grad_accum / old_batches
    if epochs <= done:
        return steps_for(epochs, old_batches, cfg.train.grad_accum)  # reached on the old world size
    return step + steps_for(epochs - done, batches, cfg.train.grad_accum)


def resolve_epochs(cfg: Config, world_size: int, resumed: "tuple[int, int] | None" = None) -> "str | None":
    """Set train.max_steps / train.stage1_steps from train.epochs / train.stage1_epochs (in place; the epochs
    fields become 0) and return the line that says how; None when the config counts in steps already.
    `resumed`: (step, world size) of the checkpoint a resumed run continues from; on another world size the
    epochs still to go are counted in this world size's steps."""
    t = cfg.train
    if t.epochs <= 0 and t.stage1_epochs <= 0:
        return None
    batches, total = batches_per_epoch(cfg, world_size)
    per_step = world_size * cfg.data.batch_size * t.grad_accum
    elastic = resumed is not None and resumed[1] != world_size and resumed[1] >= 1

    def steps(epochs: float) -> int:
        return steps_after(epochs, resumed, cfg, batches) if elastic else steps_for(epochs, batches, t.grad_accum)

    parts = []
    if t.epochs > 0:
        t.max_steps = steps(t.epochs)
        parts.append(f"train.epochs={t.epochs:g} -> train.max_steps={t.max_steps}")
    if t.stage1_epochs > 0:
        t.stage1_steps = min(steps(t.stage1_epochs), t.max_steps)
        parts.append(f"train.stage1_epochs={t.stage1_epochs:g} -> train.stage1_steps={t.stage1_steps}")
    if elastic:
        parts.append(f"resumed at step {resumed[0]} of a run on {resumed[1]} ranks")
    if not 0 <= t.stage1_steps <= t.max_steps:
        raise ConfigError(f"train.stage1_steps={t.stage1_steps} must be between 0 and train.max_steps={t.max_steps} "
                          "(resolved from train.epochs)")
    t.epochs = t.stage1_epochs = 0.0
    return (f"{'; '.join(parts)} ({total} samples in data.train_shards; {world_size} ranks x data.batch_size "
            f"{cfg.data.batch_size} x train.grad_accum {t.grad_accum} = {per_step} samples per step; "
            f"{batches / t.grad_accum:g} steps per epoch)")
