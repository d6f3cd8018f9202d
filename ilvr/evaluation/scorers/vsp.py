"""VSP spatial planning: simulate the last \\boxed{...} plan on the record's map.

Success means the player stands on the goal after the last move (off-edge moves stay,
a hole ends the game: data_pipeline.vsp_world.simulate). Accepted plans: move letters or
words separated by commas, spaces, arrows or nothing ("R,D,D", "R D D", "RDD",
"Right, Down"). Anything else in the box (digits, other words, an empty box) is
unparseable. The category is the grid size, e.g. "level4". Each score carries the chance
that a random valid plan wins on the same map (`baseline`: vsp_world.random_plan_success) and
the length of a shortest plan on it (`plan_length`: success by plan length, scorers.by_plan_length).
"""
from __future__ import annotations

import re

from data_pipeline.records import Record
from data_pipeline.sources.ilvr_jsonl import last_boxed
from data_pipeline.vsp_world import random_plan_success, shortest_plan, simulate
from ilvr.evaluation.scorers import Score

_WORDS = {"left": "L", "right": "R", "up": "U", "down": "D"}
_SEPARATORS = re.compile(r"[\s,;:|/\->→'\"`\[\]().$]+")


def parse_plan(text: str) -> list[str] | None:
    """The moves of the last \\boxed{} in `text`, or None when there is no readable plan."""
    content = last_boxed(text)
    if content is None:
        return None
    content = re.sub(r"\\text\{([^{}]*)\}", r"\1", content)  # \boxed{\text{R, D}}
    moves: list[str] = []
    for word in _SEPARATORS.split(content):
        if not word:
            continue
        lower = word.lower()
        if lower in _WORDS:
            moves.append(_WORDS[lower])
        elif re.fullmatch(r"[LRUD]+", word.upper()) and (word.isupper() or len(word) == 1):
            moves.extend(word.upper())  # "RDD" or "r"; lowercase runs like "dud" are words, not plans
        else:
            return None
    return moves or None


def gold_plan(record: Record) -> str:
    """A reference plan for the row (the record's answer, else a shortest plan on its map): any plan that
    reaches the goal is correct, so this is an example, not the only right answer."""
    if record.answer:
        return record.answer
    plan = shortest_plan(record.meta["map_desc"])
    return ",".join(plan) if plan else ""


def score(prediction: str, record: Record) -> Score:
    map_desc = record.meta.get("map_desc")
    if map_desc is None:
        raise ValueError(f"record {record.id!r} has no meta.map_desc: it is not a VSP record")
    category = f"level{record.meta.get('level', len(map_desc))}"
    moves = parse_plan(prediction)
    gold = gold_plan(record)
    chance = random_plan_success(map_desc)
    shortest = shortest_plan(map_desc)
    length = None if shortest is None else len(shortest)
    if moves is None:
        return Score(parsed=None, correct=False, category=category, detail="unparseable", gold=gold, baseline=chance,
                     plan_length=length)
    outcome = simulate(map_desc, moves)
    return Score(parsed=",".join(moves), correct=outcome.success, category=category, detail=outcome.status,
                 gold=gold, baseline=chance, plan_length=length)
