"""The scale of fed-back latent states, and the option that maps them to the targets' scale.

Stage 1 injects helper-image features (vision merger outputs: norm ~0.2 on the tiny model)
at the latent pads, but stage 2 and inference feed back final post-norm hidden states
(norm ~8): a stage-1-only model meets inputs at inference that it never saw in training.
With `model.latent_rescale=true` every fed-back state h becomes h * latent_norm / ||h||,
where latent_norm is the mean norm of the stage-1 targets, in stage 2 and in generation
alike (stage 1's alignment loss is a cosine, so it is unchanged). The value is measured
during training, stored in the checkpoint and in the exported `ilvr_settings.json`.
"""
from __future__ import annotations

import torch


def rescale(states: torch.Tensor, norm: "float | None") -> torch.Tensor:
    """`states` [..., H] scaled to L2 norm `norm` along the last dim (unchanged when norm is None).
    Differentiable: stage 2 backpropagates through it."""
    if norm is None:
        return states
    length = states.float().norm(dim=-1, keepdim=True).clamp(min=1e-6)
    return (states * (float(norm) / length)).to(states.dtype)


class MovingAverage:
    """Exponential moving average of per-step means (a vector or a scalar), bias-corrected, so that
    it follows the model as it trains. Kept per rank (cheap), averaged across ranks when stored."""

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.avg: "torch.Tensor | None" = None
        self.weight = 0.0  # 1 - decay^n: the bias correction

    def add(self, mean: torch.Tensor) -> None:
        mean = mean.detach().double().cpu()
        self.avg = (1 - self.decay) * mean if self.avg is None else self.decay * self.avg + (1 - self.decay) * mean
        self.weight = self.decay * self.weight + (1 - self.decay)

    def value(self) -> "torch.Tensor | None":
        return None if self.avg is None else (self.avg / self.weight).float()

    def state(self) -> dict:
        return {"avg": None if self.avg is None else self.avg.tolist(), "weight": self.weight}

    def load(self, state: "dict | None") -> None:
        state = state or {}
        self.avg = None if state.get("avg") is None else torch.tensor(state["avg"], dtype=torch.float64)
        self.weight = float(state.get("weight", 0.0))
