"""Zebra-CoT: normalised exact match of the final answer, reported per category.

The final answer is the last \\boxed{...}, else the text after the last "Final Answer:".
Normalisation (SQuAD-style): unwrap \\text{}, drop $, lowercase, drop punctuation and the
articles a/an/the, collapse whitespace; two numbers match when their values are equal.
"""
from __future__ import annotations

import math
import re
import string

from data_pipeline.records import Record
from data_pipeline.sources.ilvr_jsonl import last_boxed
from ilvr.evaluation.scorers import Score

_FINAL = re.compile(r"final answer\s*[:：]\s*(.+)", re.I)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def final_answer(prediction: str) -> str | None:
    boxed = last_boxed(prediction)
    if boxed is not None:
        return boxed
    lines = _FINAL.findall(prediction)
    return lines[-1].strip() if lines else None


def _number(text: str) -> float | None:
    try:
        value = float(text.replace(",", "").strip().rstrip("."))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def normalize(text: str) -> str:
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text).replace("$", "").lower()
    text = _ARTICLES.sub(" ", text.translate(_PUNCT))
    return " ".join(text.split())


def matches(predicted: str, gold: str) -> bool:
    a, b = _number(predicted.replace("$", "")), _number(gold.replace("$", ""))
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return normalize(predicted) == normalize(gold)


def score(prediction: str, record: Record) -> Score:
    if not normalize(record.answer):
        raise ValueError(f"record {record.id!r} has no reference answer")
    category = str(record.meta.get("category") or "all")
    answer = final_answer(prediction)
    if answer is None or not normalize(answer):
        return Score(parsed=None, correct=False, category=category, detail="unparseable", gold=record.answer)
    return Score(parsed=answer, correct=matches(answer, record.answer), category=category, gold=record.answer)
