"""How close `data_pipeline.vsp_world` draws the real VSP benchmark images.

Compares `render(map_desc)` with every real test image (`vsp_test/`), and
`render_states` with the step images of the MIRAGE examples (`mirage_examples/`),
as mean absolute pixel differences on the 0-255 scale (over all pixels and RGB
channels). The numbers go into docs/data.md, "VSP images". Usage:

    .venv/bin/python scripts/vsp_render_check.py [--shared-data ../shared/data]
"""
from __future__ import annotations

import argparse
import io
import json
import re
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_pipeline import vsp_world  # noqa: E402

MIRAGE_MOVES = {"LEFT": "L", "RIGHT": "R", "UP": "U", "DOWN": "D"}


def _pixels(image: bytes | Path) -> np.ndarray:
    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
        return np.asarray(opened.convert("RGB"), dtype=np.int16)


def mean_abs_diff(ours: bytes | Path, real: bytes | Path) -> float:
    """Mean |ours - real| over all pixels and RGB channels, 0-255 scale; 255 if the sizes differ."""
    a, b = _pixels(ours), _pixels(real)
    return float(np.abs(a - b).mean()) if a.shape == b.shape else 255.0


def vsp_test_rows(vsp_root: Path) -> list[dict]:
    """The real test rows (`test_direct.jsonl`), each with `local_image`, the path of its image here."""
    rows = [json.loads(line) for line in (vsp_root / "test_direct.jsonl").read_text().splitlines() if line.strip()]
    for row in rows:
        row["local_image"] = vsp_root / row["image_input"].split("vsp_spatial_planning/", 1)[1]
    return rows


def check_test_maps(rows: list[dict]) -> dict[int, list[float]]:
    """The difference of `render(map_desc)` from each real image, grouped by level (map side)."""
    by_level: dict[int, list[float]] = {}
    for row in rows:
        diff = mean_abs_diff(vsp_world.render(row["map_desc"]), row["local_image"])
        by_level.setdefault(len(row["map_desc"]), []).append(diff)
    return by_level


def infer_map(image: Path) -> list[list[int]]:
    """The map_desc of a first-step image (player on the start), each square read as the
    closest of our tiles (the MIRAGE examples come without their map_desc)."""
    pixels = _pixels(image)
    tiles = vsp_world.tile_images(vsp_world.DEFAULT_CELL_PX)
    candidates = {value: _pixels(_png(tiles[value])) for value in (vsp_world.ICE, vsp_world.HOLE, vsp_world.GOAL)}
    candidates[vsp_world.START] = _pixels(_png(tiles[vsp_world.START, vsp_world.START_FACING]))
    cell = vsp_world.DEFAULT_CELL_PX
    rows, cols = pixels.shape[0] // cell, pixels.shape[1] // cell
    return [[min(candidates, key=lambda v: np.abs(candidates[v] - pixels[r * cell:(r + 1) * cell,
                                                                      c * cell:(c + 1) * cell]).sum())
             for c in range(cols)] for r in range(rows)]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def mirage_trajectories(mirage_root: Path) -> list[tuple[list[list[int]], list[str], list[Path]]]:
    """(map_desc, moves, step images) for each example: the plan from its question, the map
    read off step 0, the images `map_NxN_step_K.png` in step order."""
    examples = []
    for line in (mirage_root / "sample.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        plan = re.search(r"Full Action Plan: (.*)", row["text_input"]).group(1)
        moves = [MIRAGE_MOVES[move.strip()] for move in plan.split(",")]
        folder = mirage_root / Path(row["image_input"]).parent.relative_to("data/examples")
        steps = sorted(folder.glob("map_*_step_*.png"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        examples.append((infer_map(steps[0]), moves, steps))
    return examples


def check_trajectory(map_desc: list[list[int]], moves: list[str], steps: list[Path]) -> list[float]:
    """The difference of each `render_states` image along the plan from the real step image."""
    path = vsp_world.simulate(map_desc, moves).path
    if len(path) != len(steps):
        raise ValueError(f"{steps[0].parent}: {len(steps)} step images but the plan visits {len(path)} states")
    ours = vsp_world.render_states(map_desc, path, moves=moves[:len(path) - 1])
    return [mean_abs_diff(png, step) for png, step in zip(ours, steps)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared-data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args(argv)

    by_level = check_test_maps(vsp_test_rows(args.shared_data / "vsp_test"))
    every = [diff for diffs in by_level.values() for diff in diffs]
    print(f"real test maps: {len(every)}, mean {statistics.fmean(every):.5f}/255, max {max(every):.5f}/255")
    for level, diffs in sorted(by_level.items()):
        print(f"  level {level}: {len(diffs)} maps, mean {statistics.fmean(diffs):.5f}, max {max(diffs):.5f}")

    steps = []
    for map_desc, moves, images in mirage_trajectories(args.shared_data / "mirage_examples"):
        steps.extend(check_trajectory(map_desc, moves, images))
    print(f"mirage step images: {len(steps)}, mean {statistics.fmean(steps):.5f}/255, max {max(steps):.5f}/255")
    return 0


if __name__ == "__main__":
    sys.exit(main())
