"""Probes of a tower's per-square features: known answers on made-up features."""
from __future__ import annotations

import pytest
import torch

from ilvr.evaluation.tower_probe import same_type_cosine, square_probes


def grid_labels(n_maps: int, side: int = 3):
    g = torch.Generator().manual_seed(0)
    rows = torch.arange(side).repeat_interleave(side).repeat(n_maps)
    cols = torch.arange(side).repeat(side * n_maps)
    types = torch.randint(0, 4, (n_maps * side * side,), generator=g)
    owner = torch.arange(n_maps).repeat_interleave(side * side)
    labels = {"type": types, "row": rows, "col": cols}
    for name in ("nbr_up", "nbr_down", "nbr_left", "nbr_right"):
        labels[name] = torch.randint(0, 5, types.shape, generator=g)
    return labels, owner


def test_probes_read_what_the_features_encode_and_not_what_they_do_not():
    labels, owner = grid_labels(40)
    onehot = lambda y, n: torch.nn.functional.one_hot(y, n).float()  # noqa: E731
    feats = torch.cat([onehot(labels["type"], 4), onehot(labels["row"], 3), onehot(labels["col"], 3),
                       onehot(labels["nbr_up"], 5), torch.randn(len(owner), 4)], dim=1)
    acc = square_probes(feats, labels, owner)
    assert acc["type"] == 1.0 and acc["row"] == 1.0 and acc["col"] == 1.0 and acc["nbr_up"] == 1.0
    assert acc["nbr_down"] < 0.4  # random labels: ~chance (0.2) on held-out maps


def test_same_type_cosine_is_one_without_position_and_drops_with_it():
    labels, _ = grid_labels(10)
    types, rows, cols = labels["type"], labels["row"], labels["col"]
    by_type = torch.randn(4, 16)[types]
    assert abs(same_type_cosine(by_type, types, rows, cols)["mean"] - 1.0) < 1e-5
    # unit type vector + orthogonal unit position vector: cosine 1/2 between two positions (1 at the same one,
    # which must not be counted: 10 maps share every position)
    position = torch.nn.functional.one_hot(rows * 3 + cols, 9).float()
    unit_type = torch.nn.functional.normalize(by_type, dim=-1)
    with_position = same_type_cosine(torch.cat([unit_type, position], 1), types, rows, cols)
    assert with_position["mean"] == pytest.approx(0.5, abs=1e-6)
    same_place = same_type_cosine(position, types, torch.zeros_like(rows), torch.zeros_like(cols))
    assert same_place["mean"] != same_place["mean"]  # nan: every pair shares its square, none is counted
