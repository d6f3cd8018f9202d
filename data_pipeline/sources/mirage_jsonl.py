"""Mirage JSONL rows -> Records.

Mirage rows carry `text_input` (question), `image_input` (input image path or
list), `image_output` (the helper image: a path, or a list of them) and
`text_output`, the target text with one `<output_image>` marker where each helper
image goes. The target is split at the markers: text before -> text step, the
helper -> latent step, text after -> text step (empty spans are dropped).

Markers and helpers must match in number. The one exception: a single helper
and no marker puts the latent step first. Anything else is a malformed_record.
The answer is the content of the last \\boxed{} in `text_output`.
"""
from __future__ import annotations

from typing import Any, Iterator

from data_pipeline.records import ImageRef, Record, RecordError, Step, with_image_placeholders
from data_pipeline.sources import record_id
from data_pipeline.sources.ilvr_jsonl import (
    carried_meta,
    convert_rows,
    default_task,
    image_refs,
    last_boxed,
    path_list,
    required_text,
)

OUTPUT_IMAGE_MARKER = "<output_image>"


def interleave(text_output: str, helpers: list[ImageRef]) -> list[Step]:
    """Text and latent steps from a target text whose markers stand for `helpers`, in order."""
    spans = text_output.split(OUTPUT_IMAGE_MARKER)
    num_markers = len(spans) - 1
    if num_markers == 0 and len(helpers) == 1:
        spans = ["", text_output]
    elif num_markers != len(helpers):
        raise RecordError(
            "malformed_record",
            f"text_output has {num_markers} {OUTPUT_IMAGE_MARKER} markers but image_output has {len(helpers)} images",
        )
    steps = []
    for i, span in enumerate(spans):
        if span.strip():
            steps.append(Step.of_text(span))
        if i < len(helpers):
            steps.append(Step.of_latent(helpers[i]))
    return steps


def row_to_record(row: dict[str, Any], line_no: int, input_path: str, image_root: str | None, task: str | None) -> Record:
    """One Mirage row as a Record; raises RecordError for a row that cannot be used."""
    images = image_refs(path_list(row.get("image_input"), "image_input"), image_root)
    helpers = image_refs(path_list(row.get("image_output"), "image_output"), image_root)
    text_output = required_text(row, "text_output")
    return Record(
        id=record_id(row, input_path, line_no),
        task=default_task(task, row),
        question=with_image_placeholders(required_text(row, "text_input"), len(images)),
        images=images,
        steps=interleave(text_output, helpers),
        answer=last_boxed(text_output) or "",
        meta=carried_meta(row),
    )


def read(input_path: str, image_root: str | None = None, task: str | None = None, **options) -> Iterator[Record | RecordError]:
    """Records from a Mirage JSONL file; unusable rows come out as RecordErrors."""
    yield from convert_rows(input_path, lambda row, line_no: row_to_record(row, line_no, input_path, image_root, task))
