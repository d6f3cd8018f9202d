"""Synthetic VSP training data, generated on the fly so the quick start needs no download.

Each record is a random solvable map, its shortest plan, and an interleaved trace:
one text step per move, each followed by a latent step whose helper image is the
map after that move. Record i depends only on (seed, i), so any prefix of a run
is reproducible on its own and two runs with the same seed are byte-identical.
"""
from __future__ import annotations

import random
from typing import Any, Iterator

from data_pipeline.records import IMAGE_PLACEHOLDER, ImageRef, Record, RecordError, Step
from data_pipeline.vsp_world import (
    CELL_NAMES,
    GOAL,
    HOLE,
    ICE,
    START,
    DEFAULT_CELL_PX,
    random_map,
    render_states,
    shortest_plan,
    simulate,
)

# The map comes first in every question: a model trained from scratch can tell image tokens apart
# only near the start of the sequence (docs/method.md, "What a from-scratch model needs").
QUESTION = (
    f"{IMAGE_PLACEHOLDER}\n"
    "You are solving a spatial planning puzzle on the frozen lake drawn above as a grid.\n"
    "\n"
    "## The map\n"
    "- Every square is either solid ice or a hole in the ice.\n"
    "- The player (an elf) stands on the start square; a gift box marks the goal square.\n"
    "\n"
    "## How moves work\n"
    "- A plan is a sequence of moves: 'L' (left), 'R' (right), 'U' (up) or 'D' (down).\n"
    "- Each move takes the player exactly one square in that direction.\n"
    "- A move that would leave the map does nothing: the player stays where it is.\n"
    "- Stepping onto a hole loses the game immediately.\n"
    "- The plan wins only if the player stands on the goal after its last move.\n"
    "- Squares are named (row,column), counting from (0,0) at the top-left corner.\n"
    "\n"
    "Find the shortest plan that brings the player safely to the goal. Put the final "
    "plan in \\boxed{}, as move letters separated by commas, for example \\boxed{R,D,D}."
)

# The same task in ~30 tokens instead of ~200: a model trained from scratch reads no rules, and every
# question token costs compute at every step (the method table and the quick start ask this one).
SHORT_QUESTION = (
    f"{IMAGE_PLACEHOLDER}\n"
    "Frozen lake: the shortest safe plan from the elf to the gift box. Moves L, R, U, D; "
    "answer like \\boxed{R,D,D}."
)
QUESTIONS = {"full": QUESTION, "short": SHORT_QUESTION}


PERCEIVE_QUESTION = (
    "{image}\nRead the frozen lake map drawn above as a grid.\n"
    "Write the map row by row from the top, one character per square from the left: P for the "
    "player (an elf), G for the goal (a gift box), H for a hole, . for solid ice, separated by spaces; rows "
    "separated by /. "
    "Then name the player's and the goal's squares as (row,column), counting from (0,0) at the top-left."
).replace("{image}", IMAGE_PLACEHOLDER)

# What a reasoning trace looks like (the method table trains one model per style):
#   latent-coords  "Move R: from (0,1) to (0,2), safe ice." + a latent step (helper: the map after the move)
#   latent-moves   "Move R." + a latent step: the text names no square, the latent must carry the state
#   text-coords    "Move R: from (0,1) to (0,2), safe ice." only
#   text-moves     "Move R." only: the state is never written down
#   direct         no trace: the answer sentence alone
#   perceive       another question: transcribe the map (perception pre-training, no plan)
#   locate         another question: the player's and the goal's squares only (perception pre-training)
STYLES = ("latent-coords", "latent-moves", "text-coords", "text-moves", "direct", "perceive", "locate")
SYMBOLS = {ICE: ".", HOLE: "H", START: "P", GOAL: "G"}


def _move_text(move: str, before: tuple[int, int], after: tuple[int, int], landed_on: int) -> str:
    return f"Move {move}: from ({before[0]},{before[1]}) to ({after[0]},{after[1]}), {CELL_NAMES[landed_on]}."


LOCATE_QUESTION = (
    "{image}\nLook at the frozen lake map drawn above as a grid.\n"
    "Name the player's square (an elf) and the goal's square (a gift box) as (row,column), counting from (0,0) "
    "at the top-left."
).replace("{image}", IMAGE_PLACEHOLDER)


def locations(map_desc: list[list[int]]) -> str:
    """The locate answer: the player's and the goal's squares."""
    where = {v: (r, c) for r, row in enumerate(map_desc) for c, v in enumerate(row) if v in (START, GOAL)}
    (pr, pc), (gr, gc) = where[START], where[GOAL]
    return f"The player is at ({pr},{pc}). The goal is at ({gr},{gc})."


def transcript(map_desc: list[list[int]]) -> str:
    """The perception answer: rows of P/G/H/. joined by ' / ', then the player's and the goal's squares."""
    rows = " / ".join(" ".join(SYMBOLS[v] for v in row) for row in map_desc)  # spaces: one token per square
    return f"The map is [{rows}]. {locations(map_desc)}"


def make_record(record_id: str, map_desc: list[list[int]], task: str, cell_px: int,
                style: str = "latent-coords", question: str = "full") -> Record:
    """The training record for one solvable map: the question (QUESTIONS), a trace in `style` (see STYLES), answer."""
    if style not in STYLES:
        raise ValueError(f"style={style!r}: choose one of {', '.join(STYLES)}")
    if question not in QUESTIONS:
        raise ValueError(f"question={question!r}: choose one of {', '.join(QUESTIONS)}")
    plan = shortest_plan(map_desc)
    if not plan:
        raise RecordError("unsolvable_map", f"{record_id}: goal not reachable from start")
    outcome = simulate(map_desc, plan)
    if not outcome.success:  # would mean the world rules and the solver disagree
        raise RecordError("unsolvable_map", f"{record_id}: shortest plan ends {outcome.status}")
    latent = style.startswith("latent-")
    images = render_states(map_desc, outcome.path if latent else outcome.path[:1], cell_px)
    meta = {"map_desc": map_desc, "level": len(map_desc), "style": style}
    if style in ("perceive", "locate"):
        text = transcript(map_desc) if style == "perceive" else locations(map_desc)
        question = PERCEIVE_QUESTION if style == "perceive" else LOCATE_QUESTION
        return Record(id=record_id, task=task, question=question, images=[ImageRef(data=images[0])],
                      steps=[Step.of_text(text)], answer=text, meta=meta)
    steps = []
    for i, move in enumerate(plan if style != "direct" else []):
        before, after = outcome.path[i], outcome.path[i + 1]
        coords = style.endswith("-coords")
        steps.append(Step.of_text(_move_text(move, before, after, map_desc[after[0]][after[1]]) if coords
                                  else f"Move {move}."))
        if latent:
            steps.append(Step.of_latent(ImageRef(data=images[i + 1])))
    answer = ",".join(plan)
    if style == "direct":
        steps.append(Step.of_text(f"The plan is \\boxed{{{answer}}}."))
    else:
        moves = "move" if len(plan) == 1 else "moves"
        steps.append(Step.of_text(f"The player reached the goal in {len(plan)} {moves}. "
                                  f"The plan is \\boxed{{{answer}}}."))
    return Record(
        id=record_id,
        task=task,
        question=QUESTIONS[question],
        images=[ImageRef(data=images[0])],
        steps=steps,
        answer=answer,
        meta=meta,
    )


def read(
    input_path: str | None = None,
    image_root: str | None = None,
    task: str | None = None,
    num_samples: int = 1000,
    min_size: int = 3,
    max_size: int = 8,
    seed: int = 0,
    hole_prob: float = 0.25,
    cell_px: int = DEFAULT_CELL_PX,
    style: str = "latent-coords",
    question: str = "full",
    **options: Any,
) -> Iterator[Record | RecordError]:
    """Yield `num_samples` synthetic VSP records with ids f"synvsp-s{seed}-{i:06d}".

    `input_path` and `image_root` exist only to fit the converter contract and are
    ignored, as are unknown `options`. Map sides are drawn uniformly from
    min_size..max_size (the level is the side length, as in the real benchmark).
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if not 2 <= min_size <= max_size:
        raise ValueError(f"need 2 <= min_size <= max_size, got {min_size}..{max_size}")
    if not 0.0 <= hole_prob < 1.0:
        raise ValueError(f"hole_prob must be in [0, 1), got {hole_prob}")
    if style not in STYLES:
        raise ValueError(f"style={style!r}: choose one of {', '.join(STYLES)}")
    if question not in QUESTIONS:
        raise ValueError(f"question={question!r}: choose one of {', '.join(QUESTIONS)}")
    task = task or "vsp"
    for i in range(num_samples):
        rng = random.Random(f"synthetic-vsp/{seed}/{i}")  # str seeds hash stably across runs
        size = rng.randint(min_size, max_size)
        map_desc = random_map(rng, size, hole_prob)
        record_id = f"synvsp-s{seed}-{i:06d}"
        try:
            yield make_record(record_id, map_desc, task, cell_px, style, question)
        except RecordError as e:
            yield e
