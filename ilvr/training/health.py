"""Is a checkpoint fit to be the one a run goes on from? Checked at every save, recorded inside it.

A diverging run can keep a finite loss for a few steps while its weights run away (lr far too
high: one AdamW step at lr=1e6 moves every weight by about 1e6). Saved as the newest checkpoint,
such weights would be what `--resume auto`, pruning and `ilvr-export` take. So each save records a
verdict in trainer.json under "health" (hashed in COMPLETE like every file), from three checks:

  weights     every trainable weight finite, and their root mean square at most
              `train.health_max_weight_rms` (trained transformers sit near 0.01-1)
  grad norm   the last step's global gradient norm (before clipping) finite and at most
              `train.health_max_grad_norm`
  loss spike  the median loss of the last 3 steps at most `train.health_loss_spike` above the median
              of up to 20 steps before them in the same stage (a sustained jump, not one odd batch)

0 turns a threshold off. A checkpoint without a record (saved before this check) is "unknown":
accepted, with a warning where one is chosen. docs/reliability.md has the reasons and defaults.
"""
from __future__ import annotations

import math
from statistics import median
from typing import Any

import torch

HEALTH_KEY = "health"  # in trainer.json


class TrainingDiverged(RuntimeError):
    """The run reached train.max_steps with an unhealthy last checkpoint: it must not end as finished (exit 0,
    finished.json, MLflow FINISHED) when what it trained is not what anyone should use."""
RECENT, WINDOW, MIN_HISTORY = 3, 20, 5  # loss spike: last steps judged, steps compared with, fewest to judge


def weight_stats(module: torch.nn.Module) -> dict[str, float]:
    """{"weight_rms", "nonfinite_weights"} over the trainable parameters of every rank (collective).
    Under ZeRO-3 each rank holds a partition (`ds_tensor`, padded with zeros): the sums are all-reduced;
    otherwise every rank holds the whole weights and rank 0's own sums are the answer."""
    from ilvr.training.distributed import all_reduce

    squares, count, nonfinite, sharded = 0.0, 0, 0, False
    for p in module.parameters():
        if not p.requires_grad:
            continue
        local = getattr(p, "ds_tensor", None)
        sharded = sharded or local is not None
        data = (local if local is not None else p).detach()
        finite = torch.isfinite(data)
        nonfinite += int((~finite).sum())
        squares += float(torch.where(finite, data, torch.zeros((), dtype=data.dtype)).double().square().sum())
        count += int(getattr(p, "ds_numel", p.numel()))
    if sharded:
        squares, nonfinite = all_reduce([squares, float(nonfinite)], "sum")
    rms = math.sqrt(squares / count) if count else 0.0
    return {"weight_rms": rms, "nonfinite_weights": int(nonfinite)}


class LossWatch:
    """The mean loss over ranks of recent steps, per stage, for the loss-spike rule (its window is saved
    in trainer.json so a resumed run judges with the history it had)."""

    def __init__(self, state: "dict | None" = None):
        state = state or {}
        self.stage = state.get("stage")
        self.losses: list[float] = [float(v) for v in state.get("losses", [])][-(WINDOW + RECENT):]

    def add(self, stage: int, loss: float) -> None:
        if stage != self.stage:  # another stage, another loss: compared with its own steps only
            self.stage, self.losses = stage, []
        if math.isfinite(loss):
            self.losses = (self.losses + [loss])[-(WINDOW + RECENT):]

    def state(self) -> dict:
        return {"stage": self.stage, "losses": self.losses}

    def spike(self) -> "tuple[float, float] | None":
        """(median of the last RECENT losses, median of those before them), or None without enough history."""
        before, recent = self.losses[:-RECENT], self.losses[-RECENT:]
        if len(before) < MIN_HISTORY or len(recent) < RECENT:
            return None
        return median(recent), median(before)


def verdict(weights: dict, grad_norm: "float | None", losses: LossWatch, train_cfg,
            loss_scaled: bool = False) -> dict[str, Any]:
    """The health record of a checkpoint: the measured values, and `problems` (empty = healthy), each naming
    the field that set its threshold. `loss_scaled` (fp16): a non-finite gradient norm is an overflow whose
    update DeepSpeed's loss scaler skipped, not a sign of divergence."""
    t = train_cfg
    problems = []
    if weights["nonfinite_weights"]:
        problems.append(f"{weights['nonfinite_weights']} weights are NaN/Inf")
    if t.health_max_weight_rms and not weights["weight_rms"] <= t.health_max_weight_rms:
        problems.append(f"weight RMS {weights['weight_rms']:.4g} > train.health_max_weight_rms="
                        f"{t.health_max_weight_rms:g}")
    if grad_norm is not None and not math.isfinite(grad_norm):
        if not loss_scaled:
            problems.append(f"gradient norm {grad_norm}")
    elif grad_norm is not None and t.health_max_grad_norm and grad_norm > t.health_max_grad_norm:
        problems.append(f"gradient norm {grad_norm:.4g} > train.health_max_grad_norm={t.health_max_grad_norm:g}")
    spike = losses.spike()
    if spike and t.health_loss_spike and spike[0] - spike[1] > t.health_loss_spike:
        problems.append(f"loss {spike[0]:.4g} over the last {RECENT} steps, {spike[0] - spike[1]:.4g} above the "
                        f"median {spike[1]:.4g} before them (> train.health_loss_spike={t.health_loss_spike:g})")
    record: dict[str, Any] = {"healthy": not problems, "problems": problems, **weights, "grad_norm": grad_norm}
    if spike:
        record["loss_recent"], record["loss_before"] = spike
    return {k: _strict_json(v) for k, v in record.items()}


def _strict_json(value: Any) -> Any:
    """NaN/Inf as the strings "nan"/"inf" (strict JSON readers refuse the bare tokens)."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def read_health(checkpoint: str) -> "dict | None":
    """The health record of a checkpoint, or None when it has none (saved before the check) or its
    trainer.json cannot be read or is implausibly large (read before verification, which names that file
    when the checkpoint is chosen)."""
    from ilvr.training.checkpoint_verify import read_trainer_state

    record = read_trainer_state(checkpoint).get(HEALTH_KEY)
    return record if isinstance(record, dict) and isinstance(record.get("healthy"), bool) else None


def unhealthy_reason(checkpoint: str) -> "str | None":
    """Why a checkpoint is marked unhealthy ("; "-joined problems), or None (healthy or no record)."""
    record = read_health(checkpoint)
    if record is None or record["healthy"]:
        return None
    return "; ".join(str(p) for p in record.get("problems", [])) or "marked unhealthy"
