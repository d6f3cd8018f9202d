"""Benchmark scorers: generated text + the reference Record -> a Score; Scores -> metrics.

A scorer only reads `record.answer`, `record.meta` and `record.task`, so the same code
scores live generation (`ilvr-eval run`) and an existing predictions file (`ilvr-eval
score`). An answer that cannot be parsed is wrong AND counted under `unparseable`, so
a model that stops following the answer format is visible, not just less accurate.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

from data_pipeline.records import Record

BENCHMARKS = ("vsp", "comt", "zebra")
_KEY_UNSAFE = re.compile(r"[^0-9A-Za-z_\-. /]")


@dataclass
class Score:
    """One prediction judged. `parsed` is None when no answer could be extracted; `gold` is the reference it
    was judged against, in the same form as `parsed` (None: the record's answer as it stands)."""

    parsed: str | None
    correct: bool
    category: str
    detail: str = ""
    gold: str | None = None
    baseline: "float | None" = None  # the chance a no-skill answer is right here (VSP: a random valid plan)
    plan_length: "int | None" = None  # the fewest steps a right answer takes, where known (VSP: shortest plan)

    @property
    def parseable(self) -> bool:
        return self.parsed is not None


Scorer = Callable[[str, Record], Score]


def get_scorer(benchmark: str) -> Scorer:
    """The scoring function of a benchmark name ("vsp", "comt", "zebra")."""
    from ilvr.evaluation.scorers import comt, vsp, zebra

    scorers = {"vsp": vsp.score, "comt": comt.score, "zebra": zebra.score}
    if benchmark not in scorers:
        raise ValueError(f"unknown benchmark {benchmark!r}: choose one of {', '.join(BENCHMARKS)}")
    return scorers[benchmark]


def infer_benchmark(records: Iterable[Record]) -> str:
    """The one benchmark all records' `task` names; an error naming the fix otherwise."""
    tasks = {r.task for r in records}
    if len(tasks) == 1 and next(iter(tasks)) in BENCHMARKS:
        return next(iter(tasks))
    raise ValueError(f"cannot infer the benchmark from the records' tasks {sorted(tasks)}: pass --benchmark "
                     f"({'|'.join(BENCHMARKS)})")


def category_key(category: str) -> str:
    """A category name as an MLflow-safe metric key part."""
    return _KEY_UNSAFE.sub("_", category.strip()) or "none"


def aggregate(scores: list[Score], benchmark: str) -> dict[str, float]:
    """Accuracy overall and per category, and how many answers were unparseable.

    VSP also reports `success_rate` (the paper's name for the same number). Where the scorer gives
    each answer a chance baseline, `baseline` (and `baseline/<category>`) is its mean: the accuracy
    of a no-skill answerer on the same records (VSP: a random valid plan of the shortest plan's length).
    Where it gives the shortest answer's length, `plan_length/<n>/count` and `plan_length/<n>/correct`
    count the records whose shortest plan has n moves, and those answered right (`by_plan_length`).
    """
    n = len(scores)
    correct = sum(s.correct for s in scores)
    unparseable = sum(not s.parseable for s in scores)
    metrics: dict[str, float] = {
        "accuracy": correct / n if n else 0.0,
        "num_samples": float(n),
        "num_correct": float(correct),
        "unparseable": float(unparseable),
        "unparseable_rate": unparseable / n if n else 0.0,
    }
    if benchmark == "vsp":
        metrics["success_rate"] = metrics["accuracy"]
    by_category: dict[str, list[Score]] = {}
    for s in scores:
        by_category.setdefault(category_key(s.category), []).append(s)
    for key in sorted(by_category):
        group = by_category[key]
        metrics[f"accuracy/{key}"] = sum(s.correct for s in group) / len(group)
        metrics[f"count/{key}"] = float(len(group))
        if all(s.baseline is not None for s in group):
            metrics[f"baseline/{key}"] = sum(s.baseline for s in group) / len(group)
    if n and all(s.baseline is not None for s in scores):
        metrics["baseline"] = sum(s.baseline for s in scores) / n
    for s in scores:
        if s.plan_length is not None:
            for what, add in (("count", 1), ("correct", int(s.correct))):
                key = f"plan_length/{s.plan_length}/{what}"
                metrics[key] = metrics.get(key, 0.0) + add
    return metrics


def by_plan_length(metrics: dict[str, float]) -> dict[str, dict[str, int]]:
    """{"<n>": {"correct": c, "count": m}} from aggregate's plan_length/<n>/* metrics, shortest plans first
    (empty when the scorer gives no plan lengths): success by how many moves the task takes at least."""
    lengths = sorted(int(k.split("/")[1]) for k in metrics if k.startswith("plan_length/") and k.endswith("/count"))
    return {str(n): {what: int(metrics[f"plan_length/{n}/{what}"]) for what in ("correct", "count")}
            for n in lengths}


def describe_plan_lengths(table: dict[str, dict[str, int]]) -> str:
    """"1 move 5/6, 2 moves 20/44, 3 moves 1/12" from by_plan_length's table."""
    return ", ".join(f"{n} move{'' if n == '1' else 's'} {c['correct']}/{c['count']}" for n, c in table.items())
