"""CoMT: multiple choice A-D, exact match on the option letter, reported per category.

The predicted letter comes from the last \\boxed{...}, else the last "answer is (X)" /
"Answer: X" phrase, else an answer that is a bare letter. A box holding an option's
text instead of its letter counts when the record lists its choices. Gold answers may
be written "B", "(B)" or "B. text".
"""
from __future__ import annotations

import re
from typing import Any

from data_pipeline.records import Record
from data_pipeline.sources.ilvr_jsonl import last_boxed
from ilvr.evaluation.scorers import Score

LETTERS = "ABCD"
_LEADING_LETTER = re.compile(r"^\s*\(?([A-D])\)?(?=$|[\s.:,)])")
# the words in any case, the letter in upper case only ("the answer is a square" names no option)
_ANSWER_PHRASE = re.compile(r"(?i:answer|option|choice)\s*(?i:is|:)?\s*\(?([A-D])\)?(?=$|[\s.,;:!)])")
_LATENT_MARKER = re.compile(r"<latent>")


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .")


def choice_texts(meta: dict[str, Any]) -> dict[str, str]:
    """Letter -> option text from meta["choices"] / meta["options"] (a list in A-D order, or a dict)."""
    raw = meta.get("choices") or meta.get("options") or []
    if isinstance(raw, dict):
        items = {str(k).strip("() .").upper(): str(v) for k, v in raw.items()}
    else:
        items = {LETTERS[i]: str(v) for i, v in enumerate(raw[: len(LETTERS)])}
    # "A. red" -> "red"
    return {k: re.sub(r"^\s*\(?[A-D]\)?[.:)]\s*", "", v) for k, v in items.items() if k in LETTERS}


def letter_of(text: str, choices: dict[str, str]) -> str | None:
    """An option's own text -> its letter; "B", "(B)", "B. red" -> "B"; else None.

    The option text is tried first, so "A large cube" is option C's text, not the letter A.
    """
    wanted = _norm(text)
    matches = [k for k, v in choices.items() if _norm(v) == wanted and wanted]
    if len(matches) == 1:
        return matches[0]
    found = _LEADING_LETTER.match(text)
    return found.group(1) if found else None


def parse_choice(prediction: str, choices: dict[str, str]) -> str | None:
    """The predicted letter, or None."""
    boxed = last_boxed(prediction)
    if boxed is not None:
        return letter_of(re.sub(r"\\text\{([^{}]*)\}", r"\1", boxed), choices)
    phrases = _ANSWER_PHRASE.findall(prediction)
    if phrases:
        return phrases[-1]
    bare = _LATENT_MARKER.sub(" ", prediction).strip()
    return letter_of(bare, choices) if len(bare) <= 3 else None


def score(prediction: str, record: Record) -> Score:
    choices = choice_texts(record.meta)
    gold = letter_of(record.answer, choices)
    if gold is None:
        raise ValueError(f"record {record.id!r}: reference answer {record.answer!r} is not a choice A-D")
    category = str(record.meta.get("category") or "all")
    parsed = parse_choice(prediction, choices)
    return Score(parsed=parsed, correct=parsed == gold, category=category,
                 detail="unparseable" if parsed is None else f"gold {gold}", gold=gold)
