"""The VSP world model: orientation against the real benchmark, rules, solver, maps, rendering."""
from __future__ import annotations

import io
import itertools
import json
import random
import re

import numpy as np
import pytest
from PIL import Image

from data_pipeline import vsp_world
from data_pipeline.vsp_world import (
    GOAL,
    HOLE,
    ICE,
    START,
    find,
    random_map,
    read_sprites,
    render,
    render_states,
    shortest_plan,
    simulate,
    sprite_dir,
    validate_map,
)
from scripts.vsp_render_check import mean_abs_diff

TABLE_SYMBOLS = {"_": ICE, "#": HOLE, "@": START, "*": GOAL}


@pytest.fixture
def real_rows(shared_data):
    """The 400 real test rows, each with the local path of its image."""
    root = shared_data / "vsp_test"
    rows = [json.loads(line) for line in (root / "test_direct.jsonl").read_text().splitlines() if line.strip()]
    for row in rows:
        row["local_image"] = root / row["image_input"].split("vsp_spatial_planning/", 1)[1]
    assert len(rows) == 400
    return rows


def _companion(row, kind: str):
    return (row["local_image"].parent.parent / kind / row["local_image"].name).with_suffix(".txt")


def test_table_files_match_map_desc(real_rows):
    for row in real_rows:
        lines = _companion(row, "table").read_text().strip().splitlines()[1:]
        table = [[TABLE_SYMBOLS[cell.strip()] for cell in line.strip().strip("|").split("|")[1:]] for line in lines]
        assert table == row["map_desc"], row["image_input"]


def test_pure_text_puts_player_on_1_and_goal_on_2(real_rows):
    for row in real_rows:
        text = _companion(row, "pure_text").read_text()
        player = re.search(r"player is at: row (\d+), column (\d+)", text).groups()
        goal = re.search(r"goal is at: Row (\d+), Column (\d+)", text).groups()
        assert find(row["map_desc"], START) == (int(player[0]) - 1, int(player[1]) - 1)
        assert find(row["map_desc"], GOAL) == (int(goal[0]) - 1, int(goal[1]) - 1)


def test_real_images_have_the_same_layout_as_ours(real_rows):
    for row in real_rows[::40]:
        n = len(row["map_desc"])
        with Image.open(row["local_image"]) as real:
            assert real.size == (64 * n, 64 * n)
        with Image.open(io.BytesIO(render(row["map_desc"]))) as ours:
            assert ours.size == (64 * n, 64 * n)


def test_shortest_plans_solve_every_real_map(real_rows):
    for row in real_rows:
        plan = shortest_plan(row["map_desc"])
        assert plan is not None, row["image_input"]
        assert simulate(row["map_desc"], plan).success, row["image_input"]


# ----------------------------------------------------------------------------- rules

#   col 0  1  2
MAP = [
    [1, 0, -1],  # row 0
    [0, 0, 0],  # row 1
    [-1, 0, 2],  # row 2
]


def test_moves_follow_row_col_orientation():
    assert simulate(MAP, ["R"]).final == (0, 1)
    assert simulate(MAP, ["D"]).final == (1, 0)
    assert simulate(MAP, ["D", "U"]).final == (0, 0)
    assert simulate(MAP, ["R", "L"]).final == (0, 0)


def test_success_and_path():
    outcome = simulate(MAP, ["R", "D", "D", "R"])
    assert outcome.success and outcome.status == "success"
    assert outcome.path == [(0, 0), (0, 1), (1, 1), (2, 1), (2, 2)]
    assert simulate(MAP, "rddr").success  # letters, any case


def test_off_edge_move_stays_in_place():
    outcome = simulate(MAP, ["U", "L", "R", "D", "D", "R"])
    assert outcome.path[:3] == [(0, 0), (0, 0), (0, 0)]
    assert outcome.success


def test_stepping_into_a_hole_fails_at_once():
    outcome = simulate(MAP, ["D", "D", "R", "R"])
    assert outcome.fell_in_hole and not outcome.success
    assert outcome.final == (2, 0)
    assert outcome.path == [(0, 0), (1, 0), (2, 0)]


def test_stopping_short_fails():
    outcome = simulate(MAP, ["R", "D", "D"])
    assert outcome.not_at_goal and outcome.final == (2, 1)


def test_reaching_the_goal_then_leaving_fails():
    outcome = simulate(MAP, ["R", "D", "D", "R", "U"])
    assert (2, 2) in outcome.path
    assert outcome.status == "not_at_goal" and outcome.final == (1, 2)


def test_empty_plan_fails():
    outcome = simulate(MAP, [])
    assert outcome.status == "not_at_goal" and outcome.path == [(0, 0)]


def test_unknown_move_is_rejected():
    with pytest.raises(ValueError, match="unknown move"):
        simulate(MAP, ["R", "X"])


@pytest.mark.parametrize(
    "bad, message",
    [
        ([], "non-empty"),
        ([[1, 2], [0]], "not rectangular"),
        ([[1, 2, 3]], "not one of"),
        ([[1, 2, True]], "not one of"),
        ([[1, 0], [0, 0]], "exactly one goal"),
        ([[1, 1], [2, 0]], "exactly one start"),
        ([[2, 0], [2, 1]], "exactly one goal"),
        ("1,2", "non-empty list"),
    ],
)
def test_validate_map_rejects(bad, message):
    with pytest.raises(ValueError, match=message):
        validate_map(bad)


def test_find():
    assert find(MAP, START) == (0, 0)
    assert find(MAP, GOAL) == (2, 2)
    assert find(MAP, HOLE) == (0, 2)  # first in reading order
    assert find([[1, 2]], HOLE) is None


# ----------------------------------------------------------------------------- solver and maps


def test_shortest_plan_none_when_walled_off():
    assert shortest_plan([[1, -1, 2]]) is None
    assert shortest_plan([[1, 0], [0, -1], [-1, 2]]) is None


def test_shortest_plan_on_a_known_map():
    assert shortest_plan(MAP) is not None and len(shortest_plan(MAP)) == 4
    assert shortest_plan([[2, 1]]) == ["L"]


def _brute_force_length(map_desc, max_len):
    """Length of the shortest successful plan, trying every plan up to max_len moves."""
    for length in range(max_len + 1):
        for plan in itertools.product("UDLR", repeat=length):
            if simulate(map_desc, plan).success:
                return length
    return None


def test_random_maps_are_solvable_and_bfs_is_minimal():
    rng = random.Random(7)
    for _ in range(25):
        size = rng.choice((2, 3))
        map_desc = random_map(rng, size, hole_prob=0.35)
        validate_map(map_desc)
        plan = shortest_plan(map_desc)
        assert plan is not None and simulate(map_desc, plan).success
        assert _brute_force_length(map_desc, len(plan)) == len(plan)


def test_random_maps_of_every_level():
    rng = random.Random(3)
    for size in range(3, 9):
        for _ in range(10):
            map_desc = random_map(rng, size, 0.25)
            assert len(map_desc) == size and all(len(row) == size for row in map_desc)
            assert simulate(map_desc, shortest_plan(map_desc)).success


def test_random_map_with_almost_only_holes_is_still_solvable():
    rng = random.Random(0)
    for _ in range(5):
        map_desc = random_map(rng, 6, hole_prob=0.97)
        assert simulate(map_desc, shortest_plan(map_desc)).success


def test_random_map_is_reproducible_from_the_rng():
    assert random_map(random.Random(5), 5) == random_map(random.Random(5), 5)


@pytest.mark.parametrize("size, hole_prob", [(1, 0.2), (4, 1.0), (4, -0.1)])
def test_random_map_rejects_bad_arguments(size, hole_prob):
    with pytest.raises(ValueError):
        random_map(random.Random(0), size, hole_prob)


# ----------------------------------------------------------------------------- rendering


def _changed_cells(a: bytes, b: bytes, rows: int, cols: int) -> set[tuple[int, int]]:
    """The squares whose pixels differ between two renderings of a rows x cols map."""
    with Image.open(io.BytesIO(a)) as first, Image.open(io.BytesIO(b)) as second:
        diff = np.any(np.asarray(first.convert("RGB")) != np.asarray(second.convert("RGB")), axis=-1)
    cell_h, cell_w = diff.shape[0] // rows, diff.shape[1] // cols
    return {(r, c) for r in range(rows) for c in range(cols)
            if diff[r * cell_h:(r + 1) * cell_h, c * cell_w:(c + 1) * cell_w].any()}


def test_render_is_a_deterministic_png_of_the_right_size():
    png = render(MAP)
    assert png == render(MAP) and png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        assert image.size == (3 * 64, 3 * 64)
    with Image.open(io.BytesIO(render(MAP, cell_px=20))) as image:
        assert image.size == (60, 60)


def test_render_draws_the_player_where_asked():
    # Leaving the start changes two squares: the elf's new one, and the start (elf -> stool).
    assert _changed_cells(render(MAP), render(MAP, (1, 2)), 3, 3) == {(0, 0), (1, 2)}
    assert _changed_cells(render(MAP, (1, 2)), render(MAP, (2, 1)), 3, 3) == {(1, 2), (2, 1)}
    assert _changed_cells(render(MAP, (1, 2)), render(MAP, (2, 2)), 3, 3) == {(1, 2), (2, 2)}  # on the goal
    wide = [[0, 0, 0, 1], [2, -1, 0, 0]]
    assert _changed_cells(render(wide), render(wide, (1, 0)), 2, 4) == {(0, 3), (1, 0)}


def test_the_elf_faces_its_last_move_and_cracks_a_hole():
    facings = [render(MAP, (1, 1), facing=f) for f in "LRUD"]
    assert len(set(facings)) == 4 and facings[3] == render(MAP, (1, 1))  # down by default
    assert _changed_cells(facings[0], facings[1], 3, 3) == {(1, 1)}
    in_hole = {render(MAP, (0, 2), facing=f) for f in "LRUD"}
    assert len(in_hole) == 1  # the cracked-hole sprite, no elf
    assert _changed_cells(render(MAP, (1, 1)), in_hole.pop(), 3, 3) == {(1, 1), (0, 2)}
    with pytest.raises(ValueError, match="unknown move"):
        render(MAP, (1, 1), facing="X")


def test_render_states_matches_render():
    positions = simulate(MAP, "RDDR").path
    assert render_states(MAP, positions) == [render(MAP, p, facing=f) for p, f in zip(positions, "DRDDR")]
    assert render_states(MAP, positions, moves="RDDR") == render_states(MAP, positions)


def test_render_states_facing_after_an_off_edge_move():
    """A move off the edge leaves the square unchanged; only `moves` tells which way the elf turned."""
    assert render_states(MAP, [(0, 0), (0, 0)], moves=["U"])[1] == render(MAP, (0, 0), facing="U")
    assert render_states(MAP, [(0, 0), (0, 1), (0, 1)])[2] == render(MAP, (0, 1), facing="R")  # keeps facing
    with pytest.raises(ValueError, match="need 1 moves"):
        render_states(MAP, [(0, 0), (0, 1)], moves="RR")


def test_render_rejects_a_player_off_the_map():
    with pytest.raises(ValueError, match="outside"):
        render(MAP, (3, 0))
    with pytest.raises(ValueError, match="outside"):
        render(MAP, (-1, 0))


def test_missing_or_changed_sprites_name_the_fix(tmp_path, monkeypatch):
    fix = re.escape('pip install "gymnasium==1.0.0"')
    with pytest.raises(RuntimeError, match=f"not found.*{fix}"):
        read_sprites(tmp_path)
    for name, data in read_sprites(sprite_dir()).items():
        (tmp_path / f"{name}.png").write_bytes(data)
    (tmp_path / "goal.png").write_bytes(b"a flag instead of the gift")
    with pytest.raises(RuntimeError, match=f"differ from those the VSP benchmark.*{fix}"):
        read_sprites(tmp_path)
    monkeypatch.setattr(vsp_world.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=f"gymnasium is not installed.*{fix}"):
        sprite_dir()


# ----------------------------------------------------------------------------- rendering vs the real images

# The renderer reproduces the real images exactly (0/255 on all 400 maps; scripts/vsp_render_check.py).
# The bound allows alpha-blend rounding changes (~0.0001/255) and catches the smallest real error seen
# on the 400 maps: the elf facing the wrong way (>= 0.28/255; a swapped start/goal >= 2/255, no grid 2.5).
MAX_DIFF = 0.05

# MIRAGE example level_6/116 (its map read off step 0): the plan walks back over the start, then into a hole.
MIRAGE_116 = [
    [0, 0, 0, -1, 0, 0],
    [-1, 0, 0, 0, -1, 2],
    [0, 0, 0, 0, -1, 0],
    [1, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, -1, 0],
    [0, 0, 0, 0, -1, 0],
]
MIRAGE_116_PLAN = "RULDUU"


def _swap_start_and_goal(map_desc):
    return [[{START: GOAL, GOAL: START}.get(cell, cell) for cell in row] for row in map_desc]


def test_render_draws_the_real_images(real_rows):
    sample = [row for level in (3, 4, 5, 6) for row in [r for r in real_rows if len(r["map_desc"]) == level][::50]]
    assert len(sample) == 8  # two maps of each level
    for row in sample:
        real = row["local_image"]
        assert mean_abs_diff(render(row["map_desc"]), real) <= MAX_DIFF, row["image_input"]
        assert mean_abs_diff(render(_swap_start_and_goal(row["map_desc"])), real) > MAX_DIFF
        assert mean_abs_diff(render(row["map_desc"], facing="L"), real) > MAX_DIFF


def test_render_states_draws_the_real_step_images(shared_data):
    folder = shared_data / "mirage_examples" / "images" / "level_6" / "116"
    steps = sorted(folder.glob("map_6x6_step_*.png"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    outcome = simulate(MIRAGE_116, MIRAGE_116_PLAN)
    assert outcome.fell_in_hole and len(steps) == len(outcome.path) == 7
    ours = render_states(MIRAGE_116, outcome.path)
    for png, step in zip(ours, steps):
        assert mean_abs_diff(png, step) <= MAX_DIFF, step.name
    # Wrong drawings fail: the elf facing down after moving right, standing beside the hole it fell in.
    assert mean_abs_diff(render(MIRAGE_116, outcome.path[1]), steps[1]) > MAX_DIFF
    assert mean_abs_diff(render(MIRAGE_116, outcome.path[5], facing="U"), steps[6]) > MAX_DIFF


def _enumerated_random_plan_success(map_desc, length):
    """The random-valid-plan baseline by brute force: every plan weighted by its probability."""
    n = len(map_desc)
    start = find(map_desc, 1)

    def walk(pos, moves, prob):
        if len(moves) == length:
            return prob * simulate(map_desc, moves).success
        moves_ = vsp_world.MOVES
        legal = [m for m, (dr, dc) in moves_.items() if 0 <= pos[0] + dr < n and 0 <= pos[1] + dc < n]
        return sum(walk((pos[0] + moves_[m][0], pos[1] + moves_[m][1]), moves + [m], prob / len(legal)) for m in legal)

    return walk(start, [], 1.0)


def test_random_plan_success_equals_brute_force():
    rng = random.Random(3)
    for size in (3, 3, 4, 4):
        map_desc = random_map(rng, size)
        length = len(shortest_plan(map_desc))
        want = _enumerated_random_plan_success(map_desc, length)
        assert vsp_world.random_plan_success(map_desc) == pytest.approx(want, abs=1e-12)
        assert vsp_world.random_plan_success(map_desc, length + 2) == pytest.approx(
            _enumerated_random_plan_success(map_desc, length + 2), abs=1e-12)
    # by hand: a corner start has 2 legal moves (R, D) and R reaches the goal; a hole below changes nothing
    assert vsp_world.random_plan_success([[1, 2, 0], [0, 0, 0], [0, 0, 0]]) == pytest.approx(0.5)
    assert vsp_world.random_plan_success([[1, 2, 0], [-1, 0, 0], [0, 0, 0]]) == pytest.approx(0.5)
