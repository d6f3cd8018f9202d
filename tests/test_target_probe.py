"""The probe of the player's square from stage-1 targets: labels per segment, features, known-answer probes."""
from __future__ import annotations

import random

import pytest
import torch

from data_pipeline.sources.synthetic_vsp import make_record
from data_pipeline.vsp_world import random_map, shortest_plan, simulate
from ilvr.evaluation.latent_probe import probe
from ilvr.evaluation.target_probe import segment_players, target_examples, target_features
from ilvr.model.selection import Selection


@pytest.mark.parametrize("style", ["latent-moves", "latent-coords"])
def test_segment_players_follow_the_plan(style):
    map_desc = random_map(random.Random("tp/0"), 4)
    record = make_record("r", map_desc, "vsp", 16, style=style)
    path = simulate(map_desc, shortest_plan(map_desc)).path
    assert segment_players(record) == path[1:]  # one latent step after each move


def test_target_features_average_the_selected_targets_only():
    targets = torch.zeros(2, 3, 2)
    targets[0, :2] = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    targets[1, :1] = torch.tensor([[5.0, 5.0]])
    sel = Selection(targets, torch.tensor([2, 1]), torch.ones(2), torch.tensor([9, 9]))
    assert target_features(sel).tolist() == [[2.0, 1.0], [5.0, 5.0]]


def test_a_probe_reads_the_square_from_targets_that_hold_it_and_not_from_ones_that_do_not():
    rng = random.Random(0)
    players = [[(rng.randrange(3), rng.randrange(3)) for _ in range(rng.randint(1, 4))] for _ in range(120)]
    flat = [p for squares in players for p in squares]
    where = torch.nn.functional.one_hot(torch.tensor([r * 3 + c for r, c in flat]), 9).float()
    noise = torch.randn(len(flat), 8, generator=torch.Generator().manual_seed(0))
    holding = probe(target_examples(torch.cat([where, noise], 1), players))
    empty = probe(target_examples(noise, players))
    assert holding["row"]["probe"] == 1.0 and holding["col"]["probe"] == 1.0
    assert empty["row"]["probe"] < 0.6 and empty["col"]["probe"] < 0.6
    with pytest.raises(ValueError, match="segments"):
        target_examples(noise[:-1], players)
