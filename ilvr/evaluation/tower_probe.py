"""What a vision tower's merged-token features say about their squares, on held-out VSP maps.

Two readings (docs/method.md asks both of a tower before ILVR's targets are taken from it):
  - linear probes: the square's type, row, column and neighbours' types, fit on half of the maps
    and tested on the other half (the position probes are ~100% even for the random tower, whose
    features hold position at ~1e-6 in cosine: a standardised probe reads it anyway);
  - same-type cosine: the mean cosine between squares of one type at DIFFERENT positions. 0.99999
    for the random tower: to a cosine (what ILVR's selection and alignment use) every ice square
    is the same vector there, so a helper image's targets cannot say where the elf went.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from data_pipeline.vsp_squares import IGNORE, SQUARE_TYPES
from ilvr.evaluation.latent_probe import fit_probe

PROBED = ("type", "row", "col", "nbr_up", "nbr_down", "nbr_left", "nbr_right")


def square_probes(features: torch.Tensor, labels: dict[str, torch.Tensor], owner: torch.Tensor,
                  seed: int = 0) -> dict[str, float]:
    """Held-out accuracy of a linear probe per label: train on the squares of half of the maps (`owner`:
    the map of each row), test on the other half; rows labelled IGNORE are left out."""
    g = torch.Generator().manual_seed(seed)
    maps = owner.unique()
    test_maps = maps[torch.randperm(len(maps), generator=g)[: len(maps) // 2]]
    test = torch.isin(owner, test_maps)
    out = {}
    for name in PROBED:
        y = labels[name]
        keep = y != IGNORE
        tr, te = keep & ~test, keep & test
        out[name] = fit_probe(features[tr].float(), y[tr], features[te].float(), y[te], int(y[keep].max()) + 1)
    return out


def same_type_cosine(features: torch.Tensor, types: torch.Tensor, rows: torch.Tensor,
                     cols: torch.Tensor) -> dict[str, float]:
    """Mean cosine between squares of one type at different (row, col), per type name and their mean."""
    unit = F.normalize(features.float(), dim=-1)
    out = {}
    for t, name in enumerate(SQUARE_TYPES):
        idx = (types == t).nonzero().squeeze(1)
        if idx.numel() < 2:
            continue
        cos = unit[idx] @ unit[idx].T
        apart = (rows[idx][:, None] != rows[idx][None, :]) | (cols[idx][:, None] != cols[idx][None, :])
        if apart.any():
            out[name] = float(cos[apart].mean())
    out["mean"] = sum(out.values()) / len(out) if out else float("nan")
    return out
