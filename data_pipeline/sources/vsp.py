"""VSP spatial-planning test JSONL rows -> evaluation Records.

Rows carry `text_input` (the prompt, with its `<image>` placeholder),
`image_input` (the rendered map), `map_id` and `map_desc`, the FrozenLake grid as
a list of rows of ints: 0 ice, -1 hole, 1 start (the player), 2 goal
(see data_pipeline.vsp_world; ILVR_METHOD.md has these two swapped). They are evaluation rows:
no target steps and no answer; the scorer simulates the predicted plan on
`meta["map_desc"]`. `meta["level"]` is the grid size n (the row count; VSP maps
are n x n).

Ids: in the public test file `map_id` restarts at 0 for every level (3x3..6x6),
so the 400 rows carry only 100 distinct map ids. A row's id is therefore its `id`
field when it has one, else f"level{n}-{map_id}" (e.g. "level3-31"), else
`<file stem>-<line number>`. These depend only on the row, so they are stable
across runs; a repeated id within one file is rejected as "duplicate_id".
"""
from __future__ import annotations

from typing import Any, Iterator

from data_pipeline.records import Record, RecordError, with_image_placeholders
from data_pipeline.sources import record_id, synthetic_vsp
from data_pipeline.vsp_world import validate_map
from data_pipeline.sources.ilvr_jsonl import convert_rows, image_refs, path_list, required_text

def check_map_desc(map_desc: Any) -> int:
    """Validate a VSP map with the world model's rules; return its size n."""
    try:
        validate_map(map_desc)
    except (ValueError, TypeError) as e:
        raise RecordError("malformed_record", f"map_desc: {e}") from None
    return len(map_desc)


def vsp_record_id(row: dict[str, Any], level: int, input_path: str, line_no: int) -> str:
    """`id`, else "level{n}-{map_id}" (map ids repeat across levels), else file stem and line."""
    if row.get("id") is None and row.get("map_id") not in (None, ""):
        return f"level{level}-{row['map_id']}"
    return record_id(row, input_path, line_no)


SYNTHETIC_QUESTION = {"synthetic": "full", "synthetic-short": "short"}  # prompt -> synthetic_vsp.QUESTIONS key
PROMPTS = ("row", *SYNTHETIC_QUESTION)


def row_to_record(row: dict[str, Any], line_no: int, input_path: str, image_root: str | None, task: str | None,
                  prompt: str = "row") -> Record:
    """One VSP test row as an evaluation Record; raises RecordError for a row that cannot be used.

    `prompt="synthetic"` ("synthetic-short") asks the synthetic training data's question
    (synthetic_vsp.QUESTIONS["full"] / ["short"]) about the row's own image and map instead of the
    row's `text_input`: a model trained from scratch on synthetic maps knows only that wording, and
    the test is then of reading the real images."""
    level = check_map_desc(row.get("map_desc"))
    images = image_refs(path_list(row.get("image_input"), "image_input"), image_root)
    meta: dict[str, Any] = {"map_desc": row["map_desc"], "map_id": row.get("map_id"), "level": level}
    return Record(
        id=vsp_record_id(row, level, input_path, line_no),
        task=task or "vsp",
        question=(with_image_placeholders(required_text(row, "text_input"), len(images)) if prompt == "row"
                  else synthetic_vsp.QUESTIONS[SYNTHETIC_QUESTION[prompt]]),
        images=images,
        steps=[],
        answer="",
        meta=meta,
    )


def read(input_path: str, image_root: str | None = None, task: str | None = None, prompt: str = "row",
         **options) -> Iterator[Record | RecordError]:
    """Evaluation Records from a VSP test JSONL file; unusable rows come out as RecordErrors."""
    if prompt not in PROMPTS:
        raise ValueError(f"prompt={prompt!r}: choose one of {', '.join(PROMPTS)}")
    yield from convert_rows(input_path,
                            lambda row, line_no: row_to_record(row, line_no, input_path, image_root, task, prompt))
