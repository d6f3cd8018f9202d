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

import hashlib
import importlib.metadata
import importlib.util
import io
import random
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
from PIL import Image

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


def random_plan_success(map_desc: MapDesc, length: "int | None" = None) -> float:
    """The chance that a random valid plan wins on this map, computed exactly: `length` moves (default:
    the shortest plan's length), each drawn uniformly from the moves that keep the player on the map.
    The baseline a model must beat to show it reads the map (it needs no picture, only the rules)."""
    validate_map(map_desc)
    if length is None:
        plan = shortest_plan(map_desc)
        if plan is None:
            return 0.0
        length = len(plan)
    n_rows, n_cols = len(map_desc), len(map_desc[0])
    alive = {find(map_desc, START): 1.0}  # position -> probability, the player not yet in a hole
    for _ in range(length):
        nxt: dict[Position, float] = {}
        for (r, c), p in alive.items():
            targets = [(r + dr, c + dc) for dr, dc in MOVES.values() if 0 <= r + dr < n_rows and 0 <= c + dc < n_cols]
            for t in targets:
                if map_desc[t[0]][t[1]] != HOLE:
                    nxt[t] = nxt.get(t, 0.0) + p / len(targets)
        alive = nxt
    return sum(p for (r, c), p in alive.items() if map_desc[r][c] == GOAL)


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
#
# The real VSP images are frames of gymnasium's FrozenLake (render_mode="rgb_array"): 64 px
# squares built from the sprites gymnasium ships, each square outlined in (180, 200, 230).
# We compose the same frames from the same sprite files with Pillow and numpy (no pygame):
# all 400 real test images and the MIRAGE step images come out pixel for pixel the same
# (docs/data.md, "VSP images"; scripts/vsp_render_check.py measures it). gymnasium 0.29.1
# to 1.3.0 ship byte-identical sprites; 1.4 replaced them (a flag goal, new tiles), so
# setup.py pins gymnasium<1.4 and _SPRITES_SHA256 refuses any other sprites.

DEFAULT_CELL_PX = 64  # the real VSP images: 64 px per square (3x3 -> 192 px, 6x6 -> 384 px)
GRID_RGB = (180, 200, 230)  # gymnasium's per-square outline, 1 px
SPRITE_FIX = 'pip install "gymnasium==1.0.0"'  # any of 0.29.1 .. 1.3.x has the benchmark's sprites
_SPRITE_NAMES = ("ice", "hole", "goal", "stool", "cracked_hole", "elf_left", "elf_down", "elf_right", "elf_up")
# sha256 of the files above, read in that order, as shipped by gymnasium 0.29.1 .. 1.3.0
_SPRITES_SHA256 = "5a208eb85d34e2a75f9f7d785a205535d1c8a17b9512bb989fd007161168cd10"
_GROUND_SPRITES = {ICE: None, HOLE: "hole", GOAL: "goal", START: "stool"}  # the stool stays on the start
FACING_SPRITES = {"L": "elf_left", "D": "elf_down", "R": "elf_right", "U": "elf_up"}
START_FACING = "D"  # gymnasium's frame before any move shows the elf facing down


def sprite_dir() -> Path:
    """gymnasium's FrozenLake sprite folder, found without importing gymnasium (or pygame)."""
    spec = importlib.util.find_spec("gymnasium")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the VSP renderer draws with gymnasium's FrozenLake sprites, "
                           f"but gymnasium is not installed: {SPRITE_FIX}")
    return Path(list(spec.submodule_search_locations)[0]) / "envs" / "toy_text" / "img"


def read_sprites(directory: Path) -> dict[str, bytes]:
    """The PNG bytes of every sprite in `directory`; fails unless they are the benchmark's own."""
    missing = [name for name in _SPRITE_NAMES if not (directory / f"{name}.png").is_file()]
    if missing:
        raise RuntimeError(f"FrozenLake sprites {missing} not found in {directory} (gymnasium "
                           f"{_installed_gymnasium()}; 1.4 removed them): {SPRITE_FIX}")
    files = {name: (directory / f"{name}.png").read_bytes() for name in _SPRITE_NAMES}
    digest = hashlib.sha256(b"".join(files.values())).hexdigest()
    if digest != _SPRITES_SHA256:
        raise RuntimeError(f"the FrozenLake sprites in {directory} (gymnasium {_installed_gymnasium()}) "
                           f"differ from those the VSP benchmark was drawn with: {SPRITE_FIX}")
    return files


def _installed_gymnasium() -> str:
    try:
        return importlib.metadata.version("gymnasium")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@lru_cache(maxsize=1)
def _sprite_files() -> dict[str, bytes]:
    return read_sprites(sprite_dir())


def _blit(dst: np.ndarray, src: np.ndarray) -> np.ndarray:
    """`src` (RGBA) drawn over `dst` (RGB) with pygame's alpha blend, d + ((s - d) * a + s) >> 8.

    The real frames match it bit for bit; Pillow's alpha_composite rounds partly transparent
    pixels (the elf's shadow, the gift's edge) one level differently."""
    s, d, a = src[..., :3].astype(np.int32), dst.astype(np.int32), src[..., 3:].astype(np.int32)
    return ((((s - d) * a + s) >> 8) + d).astype(np.uint8)


@lru_cache(maxsize=8)
def tile_images(cell_px: int) -> dict[int | tuple[int, str], Image.Image]:
    """Every square the renderer draws, `cell_px` wide: tiles[value] without the player,
    tiles[(value, facing)] with it. Composed like gymnasium: ice, the square's sprite, the
    outline, then the elf on top (or, in a hole, the cracked-hole sprite over everything)."""
    sprites = {}
    for name, data in _sprite_files().items():
        with Image.open(io.BytesIO(data)) as image:
            sprites[name] = np.asarray(image.convert("RGBA").resize((cell_px, cell_px), Image.Resampling.NEAREST))
    tiles: dict[int | tuple[int, str], np.ndarray] = {}
    for value, sprite in _GROUND_SPRITES.items():
        tile = sprites["ice"][..., :3].copy()  # opaque
        if sprite is not None:
            tile = _blit(tile, sprites[sprite])
        tile[[0, -1], :] = GRID_RGB
        tile[:, [0, -1]] = GRID_RGB
        tiles[value] = tile
        for facing, elf in FACING_SPRITES.items():
            tiles[value, facing] = _blit(tile, sprites["cracked_hole" if value == HOLE else elf])
    return _as_palette_images(tiles)


def _as_palette_images(tiles: dict) -> dict:
    """The RGB tiles as palette images sharing one palette (they use under 50 colors): the
    PNGs then encode twice as fast and half as large, with the very same pixels."""
    colors = np.unique(np.concatenate([tile.reshape(-1, 3) for tile in tiles.values()]), axis=0)
    if len(colors) > 256:
        raise RuntimeError(f"the FrozenLake tiles use {len(colors)} colors, more than a PNG palette holds")
    # Padded to 256 entries: Pillow then writes 8-bit PNGs, faster to encode than 4-bit ones.
    palette = colors.ravel().tolist() + [0] * (3 * (256 - len(colors)))
    weights = np.array([1 << 16, 1 << 8, 1])
    keys = colors.astype(np.int64) @ weights
    images = {}
    for key, tile in tiles.items():
        image = Image.fromarray(np.searchsorted(keys, tile.astype(np.int64) @ weights).astype(np.uint8), "P")
        image.putpalette(palette)
        images[key] = image
    return images


def _base_image(map_desc: MapDesc, tiles: dict, cell_px: int) -> Image.Image:
    """The map without the player: every square's tile, the start square showing its stool."""
    image = Image.new("P", (len(map_desc[0]) * cell_px, len(map_desc) * cell_px))
    image.putpalette(tiles[ICE].getpalette())
    for r, row in enumerate(map_desc):
        for c, value in enumerate(row):
            image.paste(tiles[value], (c * cell_px, r * cell_px))
    return image


def _facings(players: Sequence[Position], moves: Iterable[str] | None) -> list[str]:
    """Which way the elf faces in each state: down at first, then the last move's direction,
    as gymnasium draws it. Without `moves` it is read off the path; a state that repeats the
    previous square (a move off the edge) keeps the previous facing."""
    if moves is not None:
        moves = _normalize_moves(moves)
        if len(moves) != len(players) - 1:
            raise ValueError(f"{len(players)} player positions need {len(players) - 1} moves, got {len(moves)}")
        return [START_FACING, *moves]
    by_delta = {delta: move for move, delta in MOVES.items()}
    facings = [START_FACING]
    for before, after in zip(players, players[1:]):
        facings.append(by_delta.get((after[0] - before[0], after[1] - before[1]), facings[-1]))
    return facings


def _encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _draw_states(map_desc: MapDesc, players: Sequence[Position], facings: Sequence[str], cell_px: int) -> list[bytes]:
    """One PNG per (player, facing), all over one drawing of the static map."""
    validate_map(map_desc)
    if cell_px < 8:
        raise ValueError(f"cell_px must be at least 8, got {cell_px}")
    rows, cols = len(map_desc), len(map_desc[0])
    tiles = tile_images(cell_px)
    base = _base_image(map_desc, tiles, cell_px)
    images = []
    for (r, c), facing in zip(players, facings):
        if not (0 <= r < rows and 0 <= c < cols):
            raise ValueError(f"player position {(r, c)} is outside the {rows}x{cols} map")
        image = base.copy()
        image.paste(tiles[map_desc[r][c], facing], (c * cell_px, r * cell_px))
        images.append(_encode_png(image))
    return images


def render_states(map_desc: MapDesc, players: Sequence[Position], cell_px: int = DEFAULT_CELL_PX,
                  moves: Iterable[str] | None = None) -> list[bytes]:
    """One PNG per player position, sharing one drawing of the static map (the cheap way to
    render a whole trajectory, e.g. `simulate(...).path`), like the benchmark's step images.

    The elf faces down in the first state, then the way it last moved (`moves`, one per
    state after the first, else read off the path). Each image equals
    `render(map_desc, player, cell_px, facing)` for that state's player and facing."""
    players = [tuple(player) for player in players]
    return _draw_states(map_desc, players, _facings(players, moves), cell_px)


def render(map_desc: MapDesc, player: Position | None = None, cell_px: int = DEFAULT_CELL_PX,
           facing: str = START_FACING) -> bytes:
    """A PNG of the map with the player at `player` (default: the start square), drawn as
    gymnasium's FrozenLake draws the real VSP images.

    `cell_px` pixels per square (the benchmark: 64), textured ice with 1 px outlines, blue
    holes, the gift on the goal, the stool on the start, the elf facing `facing` (L/R/U/D;
    default down, as before any move), and in a hole the cracked-hole sprite instead of the elf.
    Same input, same bytes.
    """
    if player is None:
        validate_map(map_desc)
        player = find(map_desc, START)
    return _draw_states(map_desc, [tuple(player)], _normalize_moves([facing]), cell_px)[0]
