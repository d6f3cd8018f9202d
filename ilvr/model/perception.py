"""Perception pre-training of a tiny Qwen2.5-VL's vision tower + merger on drawn VSP states.

Why: the random tower gives every square of one type the same feature wherever it is (cosine
0.99999 across positions; docs/method.md), so ILVR's helper-image targets carry no state. A
real run starts from Qwen2.5-VL, whose tower is pretrained; this gives the tiny model one. Per
merged token (one square at patch 32) linear heads on the merger output predict the square's
type, the elf's facing, the row, the column and the 4 neighbours' types (data_pipeline/
vsp_squares.py). The heads are thrown away after training; only the tower is changed (the LM
keeps its random init), so every variant that fine-tunes from the saved base starts equal.

    draw = lambda step: collate_states(encode_states([random_state(...) for _ in range(32)], image_processor))
    heads = PerceptionHeads(hidden, max_side=5)
    losses = train_tower(model, heads, draw, steps=250, lr=1e-3)
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.records import decode_image
from data_pipeline.vsp_squares import IGNORE, LABELS, OFF_MAP, SQUARE_TYPES, square_labels
from data_pipeline.vsp_world import render
from ilvr.model.inputs import image_features


@dataclass
class EncodedState:
    """One drawn state: its patches, grid, and per-merged-token labels (LABELS -> [n_tokens] long)."""

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor  # [1, 3]
    labels: dict[str, torch.Tensor]


def encode_states(states, image_processor) -> list[EncodedState]:
    """Draw and process each (map_desc, player, facing); fails unless one merged token covers one square."""
    out = []
    merge = image_processor.merge_size
    for map_desc, player, facing in states:
        image = decode_image(render(map_desc, player, facing=facing))  # as the data pipeline decodes it
        processed = image_processor(images=[image], return_tensors="pt")
        grid = processed["image_grid_thw"].to(torch.long)
        rows, cols = int(grid[0, 1]) // merge, int(grid[0, 2]) // merge
        if (rows, cols) != (len(map_desc), len(map_desc[0])):
            raise ValueError(f"a {len(map_desc)}x{len(map_desc[0])} map gives {rows}x{cols} merged tokens: the "
                             "processor must map one square to one merged token (patch 32, merge 2 at 64 px)")
        labels = {k: torch.tensor(v, dtype=torch.long) for k, v in square_labels(map_desc, player, facing).items()}
        out.append(EncodedState(processed["pixel_values"], grid, labels))
    return out


def collate_states(states: list[EncodedState]) -> EncodedState:
    """Several states as one vision-tower call (the tower keeps images apart by their grid rows)."""
    return EncodedState(torch.cat([s.pixel_values for s in states]), torch.cat([s.grid_thw for s in states]),
                        {k: torch.cat([s.labels[k] for s in states]) for k in LABELS})


def head_classes(max_side: int) -> dict[str, int]:
    """Classes of each head: 4 types, 4 facings, max_side rows / columns, 5 neighbour types (off-map too)."""
    classes = {"type": len(SQUARE_TYPES), "facing": 4, "row": max_side, "col": max_side}
    classes.update({k: OFF_MAP + 1 for k in LABELS if k.startswith("nbr_")})
    return classes


class PerceptionHeads(nn.Module):
    """One linear head per label on the merger output (thrown away after pre-training)."""

    def __init__(self, hidden: int, max_side: int):
        super().__init__()
        # keys "<label>_head": a ModuleDict key "type" would clash with nn.Module's attributes
        self.heads = nn.ModuleDict({f"{k}_head": nn.Linear(hidden, n) for k, n in head_classes(max_side).items()})

    def losses(self, features: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cross-entropy of each head over the tokens that have its label."""
        return {k.removesuffix("_head"): F.cross_entropy(head(features.float()), labels[k.removesuffix("_head")],
                                                         ignore_index=IGNORE)
                for k, head in self.heads.items()}


def tower_features(model, batch: EncodedState) -> torch.Tensor:
    """Vision tower + merger output, one row per merged token (= square), in raster order. [N, H]."""
    return image_features(model, batch.pixel_values, batch.grid_thw)


def train_tower(model, heads: PerceptionHeads, draw_batch: Callable[[int], EncodedState], steps: int, lr: float,
                log_every: int = 0, log=print) -> list[float]:
    """Train `model.model.visual` (tower + merger) and `heads` on `draw_batch(step)` for step 1..steps; the
    LM is untouched. AdamW, 10% linear warm-up then cosine to 10%. Returns the loss of each step.
    Batches are drawn, not pooled: a 5x5 state's patches are 2.4 MB of floats."""
    params = list(model.model.visual.parameters()) + list(heads.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    warmup = max(1, steps // 10)
    model.train()
    for step in range(1, steps + 1):
        scale = min(1.0, step / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        batch = draw_batch(step)
        parts = heads.losses(tower_features(model, batch), batch.labels)
        loss = sum(parts.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if log_every and step % log_every == 0:
            log(f"step {step}/{steps}: loss {losses[-1]:.3f} " +
                " ".join(f"{k} {v.item():.3f}" for k, v in parts.items()))
    model.eval()
    return losses


def weights_sha256(model) -> str:
    """sha256 over every tensor of the state dict (sorted names, dtype, shape, bytes): same weights, same hash."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
