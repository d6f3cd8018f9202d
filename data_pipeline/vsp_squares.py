"""Per-square labels of a drawn VSP state: what one merged image token should know about its square.

Perception pre-training (ilvr/model/perception.py) teaches the vision tower, per merged token
(= one 64 px square at patch 32), its square's type, the elf's facing (on the elf's square),
its row and column, and its 4 neighbours' types. A random tower gives every square of one type
the same feature wherever it is (docs/method.md), so helper images carry no position; these
labels are what makes a tower's features say where things are.

Types are what is drawn: the elf's square is PLAYER whatever it stands on, and the start square
without the elf (its stool on ice) is ICE, a safe square like any other.
"""
from __future__ import annotations

import random

from data_pipeline.vsp_world import FACING_SPRITES, GOAL, HOLE, MapDesc, Position, random_map

SQUARE_TYPES = ("ice", "hole", "goal", "player")
T_ICE, T_HOLE, T_GOAL, T_PLAYER = range(4)
OFF_MAP = len(SQUARE_TYPES)  # a neighbour beyond the edge (neighbour labels have 5 classes)
FACINGS = tuple(FACING_SPRITES)  # "L", "D", "R", "U"
NEIGHBOURS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
IGNORE = -100  # no label here (cross-entropy's ignore_index)
LABELS = ("type", "facing", "row", "col", *(f"nbr_{name}" for name in NEIGHBOURS))


def square_type(map_desc: MapDesc, player: Position, square: Position) -> int:
    """The drawn type of `square`: PLAYER where the elf stands, else hole / goal / ice (the start is ice)."""
    if tuple(square) == tuple(player):
        return T_PLAYER
    value = map_desc[square[0]][square[1]]
    return {HOLE: T_HOLE, GOAL: T_GOAL}.get(value, T_ICE)


def square_labels(map_desc: MapDesc, player: Position, facing: str) -> dict[str, list[int]]:
    """Every label of every square, in raster order (the merged tokens' order): LABELS -> list of ints.
    `facing` is labelled on the elf's square only (IGNORE elsewhere)."""
    rows, cols = len(map_desc), len(map_desc[0])
    out: dict[str, list[int]] = {name: [] for name in LABELS}
    for r in range(rows):
        for c in range(cols):
            out["type"].append(square_type(map_desc, player, (r, c)))
            out["facing"].append(FACINGS.index(facing) if (r, c) == tuple(player) else IGNORE)
            out["row"].append(r)
            out["col"].append(c)
            for name, (dr, dc) in NEIGHBOURS.items():
                nr, nc = r + dr, c + dc
                inside = 0 <= nr < rows and 0 <= nc < cols
                out[f"nbr_{name}"].append(square_type(map_desc, player, (nr, nc)) if inside else OFF_MAP)
    return out


def random_state(rng: random.Random, min_size: int, max_size: int) -> tuple[list[list[int]], Position, str]:
    """A random solvable map with the elf on a random square (holes included: the cracked-hole sprite)
    facing a random way: the states helper images show, and more."""
    map_desc = random_map(rng, rng.randint(min_size, max_size))
    side = len(map_desc)
    player = (rng.randrange(side), rng.randrange(side))
    return map_desc, player, rng.choice(FACINGS)
