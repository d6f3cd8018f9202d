"""Zebra-CoT rows (multimodal-reasoning-lab/Zebra-CoT, exported as JSONL) -> Records.

Fields, as in the dataset card's `dataset_info` and its loader in
multimodal-reasoning-lab/Bagel-Zebra-CoT: `Question`, `Text Reasoning Trace`
(`THOUGHT 0: ...` text with image placeholders), `Final Answer`, and image columns
`problem_image_1..N` and `reasoning_image_1..N`. A placeholder is written
`<image_start>[problem_image_1]<image_end>`. An image column holds a path string
or an HF Image dict {"bytes": base64 str or null, "path": ...}.

Mapping:
- problem-image placeholders in the question become `<image>`, in order; problem
  images with no placeholder (the card promises there are none) go in front.
- each reasoning-image placeholder in the trace becomes a latent step whose helper
  is that image; the text between placeholders becomes text steps. A problem image
  named again in the trace stays as the text "[problem_image_k]" (it is an input,
  not a helper to predict).
- the trace ends with the final answer: a last text step
  "Final Answer: \\boxed{...}" is added unless the trace already ends with it.
- answer = `Final Answer`; meta["category"] = the row's `category`, else the
  `category` option (the dataset's categories are its HF configs, not a column).
"""
from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Iterator

from data_pipeline.records import IMAGE_PLACEHOLDER, ImageRef, Record, RecordError, Step, resolve_path, with_image_placeholders
from data_pipeline.sources import record_id
from data_pipeline.sources.ilvr_jsonl import convert_rows, last_boxed, required_text

QUESTION, TRACE, FINAL_ANSWER = "Question", "Text Reasoning Trace", "Final Answer"
PROBLEM_REF = re.compile(r"<image_start>\s*\[(problem_image_\d+)\]\s*<image_end>")
REASONING_REF = re.compile(r"<image_start>\s*\[(reasoning_image_\d+)\]\s*<image_end>")
PROBLEM_COLUMN = re.compile(r"problem_image_(\d+)$")


def image_column(row: dict[str, Any], name: str, image_root: str | None) -> ImageRef:
    """The image in column `name`: embedded base64 bytes, else a path resolved against `image_root`."""
    value = row.get(name)
    if isinstance(value, dict):
        data, value = value.get("bytes"), value.get("path")
        if isinstance(data, str) and data:
            try:
                return ImageRef(data=base64.b64decode(data, validate=True))
            except (binascii.Error, ValueError):
                raise RecordError("malformed_record", f"{name}: 'bytes' is not valid base64") from None
        if data is not None and data != "":
            raise RecordError("malformed_record", f"{name}: 'bytes' must be a base64 string or null")
    if isinstance(value, str) and value:
        return ImageRef(path=resolve_path(value, image_root))
    raise RecordError("missing_image", f"{name} is referenced but the row has no image for it")


def question_and_images(row: dict[str, Any], image_root: str | None) -> tuple[str, list[ImageRef]]:
    """The question with `<image>` placeholders, and its problem images in placeholder order."""
    question = required_text(row, QUESTION)
    if REASONING_REF.search(question):
        raise RecordError("malformed_record", "the question refers to a reasoning image")
    referenced = PROBLEM_REF.findall(question)
    unreferenced = sorted(
        (key for key, value in row.items() if PROBLEM_COLUMN.match(key) and value is not None and key not in referenced),
        key=lambda key: int(PROBLEM_COLUMN.match(key).group(1)),
    )
    images = [image_column(row, name, image_root) for name in unreferenced + referenced]
    question = PROBLEM_REF.sub(IMAGE_PLACEHOLDER, question)
    return with_image_placeholders(question, len(images)), images


def trace_steps(row: dict[str, Any], answer: str, image_root: str | None) -> list[Step]:
    """Text and latent steps from the reasoning trace, ending with the final answer."""
    trace = PROBLEM_REF.sub(lambda m: f"[{m.group(1)}]", required_text(row, TRACE))
    pieces = REASONING_REF.split(trace)  # text, image name, text, image name, ..., text
    steps = []
    for i, piece in enumerate(pieces):
        if i % 2:
            steps.append(Step.of_latent(image_column(row, piece, image_root)))
        elif piece.strip():
            steps.append(Step.of_text(piece.strip()))
    last_text = steps[-1].text.rstrip() if steps and steps[-1].kind == "text" else ""
    if not (last_text.endswith(answer) or last_boxed(last_text) == answer):
        steps.append(Step.of_text(f"Final Answer: \\boxed{{{answer}}}"))
    return steps


def final_answer(row: dict[str, Any]) -> str:
    """The row's `Final Answer` as text; a row without one cannot be trained or scored."""
    value = row.get(FINAL_ANSWER)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise RecordError("malformed_record", f"field {FINAL_ANSWER!r} is missing or empty")
    return value.strip()


def row_to_record(
    row: dict[str, Any], line_no: int, input_path: str, image_root: str | None, task: str | None, category: str | None
) -> Record:
    """One Zebra-CoT row as a Record; raises RecordError for a row that cannot be used."""
    answer = final_answer(row)
    question, images = question_and_images(row, image_root)
    row_category = row.get("category")
    chosen_category = row_category if row_category is not None else category
    meta = {} if chosen_category is None else {"category": chosen_category}
    return Record(
        id=record_id(row, input_path, line_no),
        task=task or "zebra",
        question=question,
        images=images,
        steps=trace_steps(row, answer, image_root),
        answer=answer,
        meta=meta,
    )


def read(input_path: str, image_root: str | None = None, task: str | None = None, **options) -> Iterator[Record | RecordError]:
    """Records from a Zebra-CoT JSONL export; option `category` names the subset when rows lack one."""
    category = options.get("category")
    yield from convert_rows(
        input_path, lambda row, line_no: row_to_record(row, line_no, input_path, image_root, task, category)
    )
