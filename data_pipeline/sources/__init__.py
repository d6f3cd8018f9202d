"""Source converters: each turns one public row format into canonical `Record`s.

A converter is a function `read(input_path, image_root, **options)` that yields
`Record`s, and yields a `RecordError` (instead of raising) for a row it cannot use,
so that `ilvr-prepare` counts the skip and goes on.
"""
from __future__ import annotations

import itertools
import json
import os
from typing import Any, Callable, Iterator

from data_pipeline.limits import MAX_LINE_BYTES
from data_pipeline.records import Record, RecordError

_SKIP_CHUNK = 1 << 20

Converter = Callable[..., Iterator["Record | RecordError"]]


def iter_jsonl(path: str, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, "dict[str, Any] | RecordError"]]:
    """Yield (1-based line number, row) for each non-blank line; a bad line gives a RecordError.

    A line longer than `max_line_bytes` is "too_large" and is skipped in bounded chunks,
    never held whole (a file with no newline at all would otherwise be read into memory).
    """
    with open(path, "rb") as f:
        for line_no in itertools.count(1):
            line = f.readline(max_line_bytes + 1)
            if not line:
                return
            if len(line) > max_line_bytes and not line.endswith(b"\n"):
                while (rest := f.readline(_SKIP_CHUNK)) and not rest.endswith(b"\n"):
                    pass
                yield line_no, RecordError("too_large", f"{path}:{line_no}: line longer than {max_line_bytes} bytes")
            elif line.strip():
                yield line_no, _parse_row(line, f"{path}:{line_no}")


def _parse_row(line: bytes, where: str) -> "dict[str, Any] | RecordError":
    """One JSONL line as a JSON object, or the RecordError saying why it is not one."""
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return RecordError("malformed_record", f"{where}: not UTF-8 ({e.reason})")
    except json.JSONDecodeError as e:
        return RecordError("malformed_record", f"{where}: not JSON ({e.msg})")
    except RecursionError:
        return RecordError("malformed_record", f"{where}: JSON nested too deeply")
    if not isinstance(row, dict):
        return RecordError("malformed_record", f"{where}: row is not a JSON object")
    return row


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
