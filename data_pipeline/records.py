"""The canonical interleaved-reasoning record, and its form inside a WebDataset shard.

Every source converter produces `Record`s; the shard writer turns them into shard
samples (JSON metadata + encoded image bytes, never pickle); the loader turns shard
samples back into `Record`s. Field meanings are documented in docs/data.md.
"""
from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

IMAGE_PLACEHOLDER = "<image>"
SCHEMA_VERSION = 1


class RecordError(ValueError):
    """A record that cannot be used. `reason` is the key it is counted under when skipped."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass
class ImageRef:
    """An image given either by its encoded bytes or by a file path read on demand."""

    path: str | None = None
    data: bytes | None = None

    def load(self) -> bytes:
        if self.data is not None:
            return self.data
        if self.path is None:
            raise RecordError("missing_image", "image has neither bytes nor a path")
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except OSError as e:
            raise RecordError("missing_image", f"cannot read {self.path}: {e.strerror}") from None


@dataclass
class Step:
    """One piece of the assistant turn: a text span, or a latent segment with its helper image."""

    kind: Literal["text", "latent"]
    text: str = ""
    image: ImageRef | None = None

    @staticmethod
    def of_text(text: str) -> "Step":
        return Step("text", text=text)

    @staticmethod
    def of_latent(image: ImageRef) -> "Step":
        return Step("latent", image=image)


@dataclass
class Record:
    """One training or evaluation example.

    `question` holds one `<image>` placeholder per entry of `images`, in order (a
    converter adds missing placeholders in front). `steps` is the whole assistant turn
    (empty for evaluation-only rows, which training skips as "no_target"); `answer` is
    the bare final answer used by scorers ("" when the source has none).
    """

    id: str
    task: str
    question: str
    images: list[ImageRef]
    steps: list[Step]
    answer: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def helper_images(self) -> list[ImageRef]:
        return [s.image for s in self.steps if s.kind == "latent"]

    @property
    def num_latent_segments(self) -> int:
        return sum(1 for s in self.steps if s.kind == "latent")


def with_image_placeholders(question: str, num_images: int) -> str:
    """Make `question` hold exactly `num_images` placeholders by adding the missing ones in front."""
    have = question.count(IMAGE_PLACEHOLDER)
    if have > num_images:
        raise RecordError(
            "malformed_record", f"question has {have} {IMAGE_PLACEHOLDER} placeholders but {num_images} images"
        )
    return IMAGE_PLACEHOLDER * (num_images - have) + question


# ----------------------------------------------------------------------------- images

_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
]


def image_extension(data: bytes) -> str:
    """The file extension of encoded image bytes, from their magic number."""
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise RecordError("corrupt_image", "bytes are not a PNG, JPEG, GIF, BMP or WEBP image")


def check_image(data: bytes) -> str:
    """Verify that `data` decodes as an image; return its extension."""
    from PIL import Image

    ext = image_extension(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:  # PIL raises many types for bad data
        raise RecordError("corrupt_image", f"image does not decode: {e}") from None
    return ext


def decode_image(data: bytes):
    """Decode encoded bytes to an RGB PIL image (the processor's input)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except Exception as e:
        raise RecordError("corrupt_image", f"image does not decode: {e}") from None


# ----------------------------------------------------------------------------- shard form

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


def shard_key(index: int, record_id: str) -> str:
    """A WebDataset sample key: unique by `index`, readable by id, and free of dots
    (WebDataset splits file names at the first dot)."""
    return f"{index:09d}_{_KEY_UNSAFE.sub('-', record_id)[:80]}"


def record_to_sample(record: Record, index: int, verify_images: bool = True) -> dict[str, Any]:
    """Encode `record` as a shard sample: metadata under "json", each image under its own name.

    Raises RecordError when an image is missing or does not decode.
    """
    sample: dict[str, Any] = {"__key__": shard_key(index, record.id)}

    def put(prefix: str, i: int, ref: ImageRef) -> str:
        data = ref.load()
        ext = check_image(data) if verify_images else image_extension(data)
        name = f"{prefix}{i}.{ext}"
        sample[name] = data
        return name

    images = [put("in", i, ref) for i, ref in enumerate(record.images)]
    steps, n_help = [], 0
    for step in record.steps:
        if step.kind == "text":
            steps.append({"type": "text", "text": step.text})
        elif step.kind == "latent":
            if step.image is None:
                raise RecordError("missing_image", f"record {record.id!r}: latent step without a helper image")
            steps.append({"type": "latent", "image": put("help", n_help, step.image)})
            n_help += 1
        else:
            raise RecordError("malformed_record", f"record {record.id!r}: unknown step kind {step.kind!r}")
    meta = {
        "schema": SCHEMA_VERSION,
        "id": record.id,
        "task": record.task,
        "question": with_image_placeholders(record.question, len(record.images)),
        "images": images,
        "steps": steps,
        "answer": record.answer,
        "meta": record.meta,
    }
    sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return sample


def sample_to_record(sample: dict[str, Any]) -> Record:
    """Decode a shard sample (a dict of raw bytes by file suffix) back into a Record.

    Only JSON and image bytes are read; nothing is unpickled. Raises RecordError for a
    sample whose metadata is missing or inconsistent.
    """
    key = sample.get("__key__", "?")
    raw = sample.get("json")
    if raw is None:
        raise RecordError("malformed_record", f"sample {key} has no json metadata")
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError("malformed_record", f"sample {key}: metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise RecordError("malformed_record", f"sample {key}: metadata is not a JSON object")

    def get(name: str, kind: type):
        value = meta.get(name)
        if not isinstance(value, kind):
            raise RecordError("malformed_record", f"sample {key}: field {name!r} missing or not {kind.__name__}")
        return value

    def image(name: Any) -> ImageRef:
        if not isinstance(name, str) or name not in sample:
            raise RecordError("missing_image", f"sample {key}: image {name!r} is not in the shard")
        return ImageRef(data=bytes(sample[name]))

    steps = []
    for s in get("steps", list):
        kind = s.get("type") if isinstance(s, dict) else None
        if kind == "text" and isinstance(s.get("text"), str):
            steps.append(Step.of_text(s["text"]))
        elif kind == "latent":
            steps.append(Step.of_latent(image(s.get("image"))))
        else:
            raise RecordError("malformed_record", f"sample {key}: bad step {s!r:.80}")
    images = [image(n) for n in get("images", list)]
    question = get("question", str)
    if question.count(IMAGE_PLACEHOLDER) != len(images):
        raise RecordError("malformed_record", f"sample {key}: placeholders do not match the {len(images)} images")
    return Record(
        id=get("id", str),
        task=get("task", str),
        question=question,
        images=images,
        steps=steps,
        answer=meta.get("answer") or "",
        meta=meta.get("meta") or {},
    )


def resolve_path(path: str, image_root: str | None) -> str:
    """Resolve an image path written in a source file against `image_root`.

    Absolute paths are kept. Source files often carry the authors' own layout in
    front (VSP rows say "./data/vsp_spatial_planning/imgs_test/...", Mirage rows
    "./data/examples/images/..."), so the first of root/a/b/c, root/b/c, root/c
    that exists is taken; if none exists, root/a/b/c is returned and the read fails
    later with a counted "missing_image".
    """
    if os.path.isabs(path):
        return path
    root = image_root or "."
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    for start in range(len(parts)):
        candidate = os.path.join(root, *parts[start:])
        if os.path.isfile(candidate):
            return candidate
    return os.path.join(root, *parts)
