"""ILVR JSONL rows -> Records.

The ILVR reference release stores one example per line:
  `text_input`     the question (may already hold `<image>` placeholders),
  `image_input`    a path or a list of paths (the input images),
  `sequence_plan`  the assistant turn, a list of {"type": "text", "content": ...}
                   and {"type": "latent", "helper_image": path} items.
Test rows add `original_final_answer` and, for VSP, `map_desc`.

The small helpers the other JSONL converters share (the row loop that locates
errors and rejects repeated ids, path lists, \\boxed{} extraction, carried meta)
live here too, so every converter reports problems the same way.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from data_pipeline.records import ImageRef, Record, RecordError, Step, resolve_path, with_image_placeholders
from data_pipeline.sources import iter_jsonl, record_id

# Row fields kept in Record.meta when present: VSP maps and CoMT-style choices.
CARRIED_META_FIELDS = ("map_desc", "map_id", "category", "choices", "options")

RowConverter = Callable[[dict[str, Any], int], Record]


def convert_rows(input_path: str, convert: RowConverter) -> Iterator[Record | RecordError]:
    """Apply `convert(row, line_no)` to each JSONL row of `input_path`.

    A row that `convert` rejects, a line that is not a JSON object, and a row whose
    id was already used earlier in the file each come out as a RecordError naming
    file:line, so the caller counts the skip and goes on.
    """
    seen_ids: set[str] = set()
    for line_no, row in iter_jsonl(input_path):
        if isinstance(row, RecordError):
            yield row
            continue
        try:
            record = convert(row, line_no)
        except RecordError as err:
            yield RecordError(err.reason, f"{input_path}:{line_no}: {error_detail(err)}")
            continue
        if record.id in seen_ids:
            yield RecordError("duplicate_id", f"{input_path}:{line_no}: id {record.id!r} was already used in this file")
            continue
        seen_ids.add(record.id)
        yield record


def error_detail(err: RecordError) -> str:
    """The message of `err` without its "reason: " prefix."""
    text, prefix = str(err), f"{err.reason}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def required_text(row: dict[str, Any], field: str) -> str:
    """A string field the row must have."""
    value = row.get(field)
    if not isinstance(value, str):
        raise RecordError("malformed_record", f"field {field!r} is missing or not a string")
    return value


def path_list(value: Any, field: str) -> list[str]:
    """A field holding one path or a list of paths, as a list of paths."""
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and all(isinstance(p, str) and p for p in value):
        return list(value)
    raise RecordError("malformed_record", f"field {field!r} must be a path or a list of paths, got {value!r:.80}")


def image_refs(paths: list[str], image_root: str | None) -> list[ImageRef]:
    """ImageRefs for source paths; nothing is read here (the shard writer checks the files)."""
    return [ImageRef(path=resolve_path(p, image_root)) for p in paths]


def last_boxed(text: str) -> str | None:
    """The content of the last balanced \\boxed{...} in `text`, or None when there is none."""
    opener = "\\boxed{"
    start = text.rfind(opener)
    while start != -1:
        content_start = i = start + len(opener)
        depth = 1
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[content_start : i - 1].strip()
        start = text.rfind(opener, 0, start)
    return None


def default_task(task: str | None, row: dict[str, Any]) -> str:
    """The caller's task name, else "vsp" for rows carrying a map, else "generic"."""
    return task or ("vsp" if row.get("map_desc") is not None else "generic")


def carried_meta(row: dict[str, Any]) -> dict[str, Any]:
    """Task metadata the scorers need (VSP map and its size, multiple-choice fields)."""
    meta = {key: row[key] for key in CARRIED_META_FIELDS if row.get(key) is not None}
    if isinstance(meta.get("map_desc"), list):
        meta["level"] = len(meta["map_desc"])
    return meta


def _plan_steps(plan: Any, image_root: str | None) -> list[Step]:
    """The assistant turn from a `sequence_plan` (absent: an evaluation row with no target)."""
    if plan is None:
        return []
    if not isinstance(plan, list):
        raise RecordError("malformed_record", "field 'sequence_plan' is not a list")
    steps = []
    for i, item in enumerate(plan):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text" and isinstance(item.get("content"), str):
            steps.append(Step.of_text(item["content"]))
        elif kind == "latent" and isinstance(item.get("helper_image"), str) and item["helper_image"]:
            steps.append(Step.of_latent(ImageRef(path=resolve_path(item["helper_image"], image_root))))
        else:
            raise RecordError(
                "malformed_record",
                f"sequence_plan[{i}] is neither a text step with string content "
                f"nor a latent step with a helper_image path: {item!r:.80}",
            )
    return steps


def _answer(row: dict[str, Any], steps: list[Step]) -> str:
    """`original_final_answer`, else the last \\boxed{} of the text steps, else ""."""
    explicit = row.get("original_final_answer")
    if explicit is not None:
        return str(explicit).strip()
    text = "".join(step.text for step in steps if step.kind == "text")
    return last_boxed(text) or ""


def row_to_record(row: dict[str, Any], line_no: int, input_path: str, image_root: str | None, task: str | None) -> Record:
    """One ILVR JSONL row as a Record; raises RecordError for a row that cannot be used."""
    images = image_refs(path_list(row.get("image_input"), "image_input"), image_root)
    steps = _plan_steps(row.get("sequence_plan"), image_root)
    return Record(
        id=record_id(row, input_path, line_no),
        task=default_task(task, row),
        question=with_image_placeholders(required_text(row, "text_input"), len(images)),
        images=images,
        steps=steps,
        answer=_answer(row, steps),
        meta=carried_meta(row),
    )


def read(input_path: str, image_root: str | None = None, task: str | None = None, **options) -> Iterator[Record | RecordError]:
    """Records from an ILVR JSONL file; unusable rows come out as RecordErrors."""
    yield from convert_rows(input_path, lambda row, line_no: row_to_record(row, line_no, input_path, image_root, task))
