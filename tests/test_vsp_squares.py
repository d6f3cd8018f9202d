"""Per-square labels of drawn VSP states (what perception pre-training teaches each merged token)."""
from __future__ import annotations

import random

from data_pipeline.vsp_squares import FACINGS, IGNORE, OFF_MAP, T_GOAL, T_HOLE, T_ICE, T_PLAYER, random_state, square_labels


def test_labels_of_a_hand_made_map_in_raster_order():
    map_desc = [[1, 0, -1],
                [0, -1, 0],
                [0, 0, 2]]
    labels = square_labels(map_desc, (0, 1), "R")  # the elf moved right: the start (0,0) shows its stool = ice
    assert labels["type"] == [T_ICE, T_PLAYER, T_HOLE, T_ICE, T_HOLE, T_ICE, T_ICE, T_ICE, T_GOAL]
    assert labels["facing"] == [IGNORE, FACINGS.index("R")] + [IGNORE] * 7
    assert labels["row"] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert labels["col"] == [0, 1, 2] * 3
    # square (1,1): up is the elf, down ice, left ice, right ice; square (0,0): off the map up and left
    assert [labels[k][4] for k in ("nbr_up", "nbr_down", "nbr_left", "nbr_right")] == [T_PLAYER, T_ICE, T_ICE, T_ICE]
    assert [labels[k][0] for k in ("nbr_up", "nbr_down", "nbr_left", "nbr_right")] == [OFF_MAP, T_ICE, OFF_MAP, T_PLAYER]
    assert labels["nbr_right"][2] == OFF_MAP and labels["nbr_down"][8] == OFF_MAP


def test_random_states_are_seeded_and_span_sizes_and_facings():
    draws = [random_state(random.Random(f"t/{i}"), 3, 5) for i in range(200)]
    assert draws == [random_state(random.Random(f"t/{i}"), 3, 5) for i in range(200)]
    assert {len(m) for m, _, _ in draws} == {3, 4, 5}
    assert {f for _, _, f in draws} == set(FACINGS)
    assert all(0 <= p[0] < len(m) and 0 <= p[1] < len(m) for m, p, _ in draws)
