"""The VSP (FrozenLake-style) spatial planning world: rules, solver, map generator, renderer.

Shared by the synthetic data generator and the VSP scorer, so both agree on what
a plan does. Maps use the real benchmark's `map_desc`: a list of rows of ints,
addressed `map_desc[row][col]`, with

    0 = ice (safe), -1 = hole, 1 = start (where the player stands), 2 = goal.

Start = 1 and goal = 2 was checked on all 400 real test maps: the player sprite
in every image, the "player is at" line of every `pure_text/` file and the "@"
of every `table/` file sit on the 1; the gift / "goal is at" / "*" on the 2.
Moves: "U" = row - 1, "D" = row + 1, "L" = col - 1, "R" = col + 1.
"""
from __future__ import annotations

import io
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence

from PIL import Image, ImageDraw

ICE, HOLE, START, GOAL = 0, -1, 1, 2
CELL_VALUES = (ICE, HOLE, START, GOAL)
CELL_NAMES = {ICE: "safe ice", HOLE: "a hole", START: "the start square", GOAL: "the goal"}

MOVES: dict[str, tuple[int, int]] = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}
# BFS tries moves in this order; it reproduces most ground-truth plans of the real train set.
SEARCH_ORDER = ("U", "L", "R", "D")

Position = tuple[int, int]
MapDesc = Sequence[Sequence[int]]


# ----------------------------------------------------------------------------- map checks


def validate_map(map_desc: MapDesc) -> None:
    """Raise ValueError unless `map_desc` is a non-empty rectangle of legal cell values
    with exactly one start and one goal."""
    if not isinstance(map_desc, (list, tuple)) or not map_desc:
        raise ValueError("map_desc must be a non-empty list of rows")
    width = None
    counts = {value: 0 for value in CELL_VALUES}
    for r, row in enumerate(map_desc):
        if not isinstance(row, (list, tuple)) or not row:
            raise ValueError(f"map_desc row {r} must be a non-empty list of cells")
        if width is None:
            width = len(row)
        elif len(row) != width:
            raise ValueError(f"map_desc is not rectangular: row {r} has {len(row)} cells, row 0 has {width}")
        for c, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, int) or value not in counts:
                raise ValueError(f"map_desc[{r}][{c}] = {value!r} is not one of {CELL_VALUES}")
            counts[value] += 1
    for value, name in ((START, "start (1)"), (GOAL, "goal (2)")):
        if counts[value] != 1:
            raise ValueError(f"map_desc must hold exactly one {name}, found {counts[value]}")


def find(map_desc: MapDesc, value: int) -> Position | None:
    """The (row, col) of the first cell holding `value`, in reading order; None if absent."""
    for r, row in enumerate(map_desc):
        for c, cell in enumerate(row):
            if cell == value:
                return (r, c)
    return None


def _step(map_desc: MapDesc, pos: Position, move: str) -> Position:
    """Where one move leads; a move off the edge leaves the player in place."""
    dr, dc = MOVES[move]
    r, c = pos[0] + dr, pos[1] + dc
    if 0 <= r < len(map_desc) and 0 <= c < len(map_desc[0]):
        return (r, c)
    return pos


def _normalize_moves(moves: Iterable[str]) -> list[str]:
    normalized = []
    for move in moves:
        letter = move.strip().upper() if isinstance(move, str) else None
        if letter not in MOVES:
            raise ValueError(f"unknown move {move!r}; moves are {sorted(MOVES)}")
        normalized.append(letter)
    return normalized


# ----------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Outcome:
    """What a plan did: the status, where it ended, and every square stood on (start first)."""

    status: Literal["success", "fell_in_hole", "not_at_goal"]
    final: Position
    path: list[Position] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return self.status == "success"

    @property
    def fell_in_hole(self) -> bool:
        return self.status == "fell_in_hole"

    @property
    def not_at_goal(self) -> bool:
        return self.status == "not_at_goal"


def simulate(map_desc: MapDesc, moves: Iterable[str]) -> Outcome:
    """Play `moves` (letters L/R/U/D, case-insensitive) from the start square.

    Off-edge moves stay in place; stepping onto a hole ends the game at once
    (later moves are ignored); success only if the player stands on the goal
    after the LAST move, so passing over the goal and leaving is not success.
    """
    validate_map(map_desc)
    pos = find(map_desc, START)
    path = [pos]
    for move in _normalize_moves(moves):
        pos = _step(map_desc, pos, move)
        path.append(pos)
        if map_desc[pos[0]][pos[1]] == HOLE:
            return Outcome("fell_in_hole", pos, path)
    status = "success" if map_desc[pos[0]][pos[1]] == GOAL else "not_at_goal"
    return Outcome(status, pos, path)


def shortest_plan(map_desc: MapDesc) -> list[str] | None:
    """A fewest-moves plan from start to goal over non-hole squares (BFS); None if unreachable."""
    validate_map(map_desc)
    start, goal = find(map_desc, START), find(map_desc, GOAL)
    came_from: dict[Position, tuple[Position, str] | None] = {start: None}
    queue = deque([start])
    while queue:
        pos = queue.popleft()
        if pos == goal:
            break
        for move in SEARCH_ORDER:
            nxt = _step(map_desc, pos, move)
            if nxt not in came_from and map_desc[nxt[0]][nxt[1]] != HOLE:
                came_from[nxt] = (pos, move)
                queue.append(nxt)
    if goal not in came_from:
        return None
    plan = []
    pos = goal
    while came_from[pos] is not None:
        pos, move = came_from[pos]
        plan.append(move)
    return plan[::-1]


def random_map(rng: random.Random, size: int, hole_prob: float = 0.25) -> list[list[int]]:
    """A random `size` x `size` map whose goal is reachable from its (different) start.

    Each non-start, non-goal square is a hole with probability `hole_prob`; unsolvable
    draws are redrawn, and after many failures a straight L-shaped corridor is cleared,
    so the call always returns (the map is then slightly less random).
    """
    if size < 2:
        raise ValueError(f"size must be at least 2 (start and goal differ), got {size}")
    if not 0.0 <= hole_prob < 1.0:
        raise ValueError(f"hole_prob must be in [0, 1), got {hole_prob}")
    cells = [(r, c) for r in range(size) for c in range(size)]
    for _attempt in range(100):
        start, goal = rng.sample(cells, 2)
        grid = [[HOLE if rng.random() < hole_prob else ICE for _ in range(size)] for _ in range(size)]
        grid[start[0]][start[1]] = START
        grid[goal[0]][goal[1]] = GOAL
        if shortest_plan(grid) is not None:
            return grid
    # Clear a corridor: along the start row to the goal column, then down/up that column.
    r, c = start
    while (r, c) != goal:
        if c != goal[1]:
            c += 1 if goal[1] > c else -1
        else:
            r += 1 if goal[0] > r else -1
        if grid[r][c] == HOLE:
            grid[r][c] = ICE
    return grid


# ----------------------------------------------------------------------------- rendering

# A fixed palette: images are drawn in palette mode, which keeps PNG encoding fast and small.
_COLORS = {
    "ice": (221, 234, 246),
    "grid": (163, 193, 222),
    "water": (64, 156, 222),
    "water_rim": (30, 92, 164),
    "water_glint": (178, 220, 246),
    "box": (204, 112, 44),
    "box_dark": (94, 54, 32),
    "ribbon": (250, 204, 64),
    "stool": (138, 78, 58),
    "skin": (242, 204, 164),
    "hat": (40, 150, 64),
    "coat": (200, 44, 44),
    "ink": (40, 30, 30),
}
_INDEX = {name: i for i, name in enumerate(_COLORS)}
# Padded to 256 entries: Pillow then writes 8-bit PNGs, which encode faster than the
# 4-bit packing it picks for palettes of <= 16 colors.
_PALETTE = [channel for rgb in _COLORS.values() for channel in rgb] + [0] * (3 * (256 - len(_COLORS)))

DEFAULT_CELL_PX = 64  # the real VSP images: 64 px per square (3x3 -> 192 px, 6x6 -> 384 px)


def _box(x: int, y: int, cell: int, left: float, top: float, right: float, bottom: float) -> list[int]:
    """Pixel box of the fractional rectangle (left, top, right, bottom) of the square at (x, y)."""
    return [x + round(left * cell), y + round(top * cell), x + round(right * cell), y + round(bottom * cell)]


def _point(x: int, y: int, cell: int, fx: float, fy: float) -> tuple[int, int]:
    return (x + round(fx * cell), y + round(fy * cell))


def _draw_hole(draw: ImageDraw.ImageDraw, x: int, y: int, cell: int) -> None:
    draw.ellipse(_box(x, y, cell, 0.08, 0.12, 0.92, 0.88), fill=_INDEX["water"], outline=_INDEX["water_rim"],
                 width=max(1, cell // 24))
    for top in (0.35, 0.5, 0.65):
        draw.line(_box(x, y, cell, 0.3, top, 0.55, top - 0.08), fill=_INDEX["water_glint"], width=max(1, cell // 32))


def _draw_goal(draw: ImageDraw.ImageDraw, x: int, y: int, cell: int) -> None:
    line = max(1, cell // 32)
    draw.rectangle(_box(x, y, cell, 0.22, 0.36, 0.78, 0.8), fill=_INDEX["box"], outline=_INDEX["box_dark"], width=line)
    draw.rectangle(_box(x, y, cell, 0.45, 0.36, 0.55, 0.8), fill=_INDEX["ribbon"])
    draw.rectangle(_box(x, y, cell, 0.22, 0.52, 0.78, 0.6), fill=_INDEX["ribbon"])
    draw.ellipse(_box(x, y, cell, 0.3, 0.22, 0.5, 0.38), outline=_INDEX["ribbon"], width=max(1, cell // 20))
    draw.ellipse(_box(x, y, cell, 0.5, 0.22, 0.7, 0.38), outline=_INDEX["ribbon"], width=max(1, cell // 20))


def _draw_stool(draw: ImageDraw.ImageDraw, x: int, y: int, cell: int) -> None:
    """The empty start square, as in the real trajectory images."""
    draw.rectangle(_box(x, y, cell, 0.4, 0.42, 0.6, 0.5), fill=_INDEX["stool"])
    draw.rectangle(_box(x, y, cell, 0.42, 0.5, 0.47, 0.6), fill=_INDEX["stool"])
    draw.rectangle(_box(x, y, cell, 0.53, 0.5, 0.58, 0.6), fill=_INDEX["stool"])


def _draw_player(draw: ImageDraw.ImageDraw, x: int, y: int, cell: int) -> None:
    """A small elf: green hat, face, red coat, dark boots."""
    draw.rectangle(_box(x, y, cell, 0.36, 0.78, 0.46, 0.88), fill=_INDEX["ink"])
    draw.rectangle(_box(x, y, cell, 0.54, 0.78, 0.64, 0.88), fill=_INDEX["ink"])
    draw.rectangle(_box(x, y, cell, 0.32, 0.52, 0.68, 0.8), fill=_INDEX["coat"], outline=_INDEX["ink"])
    draw.ellipse(_box(x, y, cell, 0.34, 0.28, 0.66, 0.56), fill=_INDEX["skin"], outline=_INDEX["ink"])
    hat = [_point(x, y, cell, 0.3, 0.36), _point(x, y, cell, 0.5, 0.08), _point(x, y, cell, 0.7, 0.36)]
    draw.polygon(hat, fill=_INDEX["hat"], outline=_INDEX["ink"])
    for left in (0.42, 0.54):
        draw.rectangle(_box(x, y, cell, left, 0.4, left + 0.04, 0.45), fill=_INDEX["ink"])


def _base_image(map_desc: MapDesc, cell_px: int) -> Image.Image:
    """The map without player or start marker: ice, grid lines, holes and the goal."""
    rows, cols = len(map_desc), len(map_desc[0])
    image = Image.new("P", (cols * cell_px, rows * cell_px), _INDEX["ice"])
    image.putpalette(_PALETTE)
    draw = ImageDraw.Draw(image)
    for r, row in enumerate(map_desc):
        for c, value in enumerate(row):
            if value == HOLE:
                _draw_hole(draw, c * cell_px, r * cell_px, cell_px)
            elif value == GOAL:
                _draw_goal(draw, c * cell_px, r * cell_px, cell_px)
    line = max(1, cell_px // 32)
    for r in range(rows + 1):
        y = min(r * cell_px, rows * cell_px - line)
        draw.rectangle([0, y, cols * cell_px - 1, y + line - 1], fill=_INDEX["grid"])
    for c in range(cols + 1):
        x = min(c * cell_px, cols * cell_px - line)
        draw.rectangle([x, 0, x + line - 1, rows * cell_px - 1], fill=_INDEX["grid"])
    return image


def _encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def render_states(map_desc: MapDesc, players: Sequence[Position], cell_px: int = DEFAULT_CELL_PX) -> list[bytes]:
    """One PNG per player position, sharing one drawing of the static map (the cheap way to
    render a whole trajectory). Each equals `render(map_desc, player, cell_px)`."""
    validate_map(map_desc)
    if cell_px < 8:
        raise ValueError(f"cell_px must be at least 8, got {cell_px}")
    rows, cols = len(map_desc), len(map_desc[0])
    start = find(map_desc, START)
    base = _base_image(map_desc, cell_px)
    images = []
    for player in players:
        r, c = player
        if not (0 <= r < rows and 0 <= c < cols):
            raise ValueError(f"player position {player} is outside the {rows}x{cols} map")
        image = base.copy()
        draw = ImageDraw.Draw(image)
        if (r, c) != start:
            _draw_stool(draw, start[1] * cell_px, start[0] * cell_px, cell_px)
        _draw_player(draw, c * cell_px, r * cell_px, cell_px)
        images.append(_encode_png(image))
    return images


def render(map_desc: MapDesc, player: Position | None = None, cell_px: int = DEFAULT_CELL_PX) -> bytes:
    """A PNG of the map with the player at `player` (default: the start square).

    Style follows the real VSP images: `cell_px` pixels per square on light ice with
    grid lines, holes as blue pools, the goal as a gift box, the player as an elf,
    and the start square (once left) as a small stool. Same input, same bytes.
    """
    if player is None:
        validate_map(map_desc)
        player = find(map_desc, START)
    return render_states(map_desc, [tuple(player)], cell_px)[0]
