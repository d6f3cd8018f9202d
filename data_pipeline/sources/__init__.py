"""Source converters: each turns one public row format into canonical `Record`s.

A converter is a function `read(input_path, image_root, **options)` that yields
`Record`s, and yields a `RecordError` (instead of raising) for a row it cannot use,
so that `ilvr-prepare` counts the skip and goes on.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator

from data_pipeline.records import Record, RecordError

Converter = Callable[..., Iterator["Record | RecordError"]]


def iter_jsonl(path: str) -> Iterator[tuple[int, "dict[str, Any] | RecordError"]]:
    """Yield (1-based line number, row) for each non-blank line; a bad line gives a RecordError."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield line_no, RecordError("malformed_record", f"{path}:{line_no}: not JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                yield line_no, RecordError("malformed_record", f"{path}:{line_no}: row is not a JSON object")
                continue
            yield line_no, row


def record_id(row: dict[str, Any], path: str, line_no: int) -> str:
    """The stable id of a source row: its `id`, else its `map_id`, else `<file stem>-<line number>`."""
    for key in ("id", "map_id"):
        value = row.get(key)
        if value is not None and str(value) != "":
            return str(value)
    stem = os.path.splitext(os.path.basename(path))[0]
    return f"{stem}-{line_no}"


def get_converter(name: str) -> Converter:
    """The converter for a `--source` name."""
    from data_pipeline.sources import ilvr_jsonl, mirage_jsonl, synthetic_vsp, vsp, zebra_cot

    table: dict[str, Converter] = {
        "ilvr": ilvr_jsonl.read,
        "mirage": mirage_jsonl.read,
        "vsp": vsp.read,
        "zebra": zebra_cot.read,
        "synthetic": synthetic_vsp.read,
    }
    if name not in table:
        raise ValueError(f"unknown source {name!r}; choose one of {sorted(table)}")
    return table[name]


SOURCE_NAMES = ("ilvr", "mirage", "vsp", "zebra", "synthetic")
