"""Can the stage-1 targets carry the state? A held-out linear probe of the player's square from them.

latent_probe.py asks this of the states a trained model feeds back; this asks it of what stage 1
aligns them to: the K* helper-image features the teacher selected for each segment. If a probe
cannot read the player's square from a segment's targets, alignment cannot teach the latent to
carry it. Same probe, split (by map) and step-only control as latent_probe.probe.

    labels = [segment_players(r) for r in records]              # the records of one stage-1 batch
    x = target_features(select_targets(teacher, batch, cfg.loss, K))
    result = probe(target_examples(x, labels))
"""
from __future__ import annotations

import re

import torch

from data_pipeline.records import Record
from data_pipeline.vsp_world import simulate
from ilvr.model.selection import Selection

MOVE = re.compile(r"Move ([LRUD])")


def segment_players(record: Record) -> list[tuple[int, int]]:
    """The player's square at each latent step of a VSP record: after the moves its text steps named so far."""
    moves, out = [], []
    for step in record.steps:
        if step.kind == "text":
            moves += MOVE.findall(step.text)
        else:
            out.append(simulate(record.meta["map_desc"], moves).final)
    return out


def target_features(selection: Selection) -> torch.Tensor:
    """Each segment's selected targets as one vector: their mean (order-free: picks come by probability). [S, H]."""
    counts = selection.counts.clamp(min=1).to(selection.targets.dtype)
    return selection.targets.float().sum(1) / counts.float()[:, None]


def target_examples(features: torch.Tensor, players: list[list[tuple[int, int]]]):
    """(features, rows, cols, sample, step) for latent_probe.probe; `players[i]`: sample i's squares per
    segment, in the batch's segment order (sample by sample, segments in order)."""
    flat = [(i, s, pos) for i, squares in enumerate(players) for s, pos in enumerate(squares)]
    if len(flat) != features.shape[0]:
        raise ValueError(f"{features.shape[0]} segments but {len(flat)} labelled latent steps")
    return (features, torch.tensor([p[0] for _, _, p in flat]), torch.tensor([p[1] for _, _, p in flat]),
            torch.tensor([i for i, _, _ in flat]), torch.tensor([s for _, s, _ in flat]))
