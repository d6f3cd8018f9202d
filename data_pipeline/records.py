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
import stat
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from data_pipeline.limits import DEFAULT_LIMITS, MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, MAX_MEMBER_BYTES, Limits
from data_pipeline.pixels import displayed_rgb

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

    def load(self, max_bytes: int = MAX_MEMBER_BYTES) -> bytes:
        """The encoded bytes; a path is read only if it is a regular file of at most `max_bytes`."""
        if self.data is not None:
            if len(self.data) > max_bytes:
                raise RecordError("too_large", f"embedded image is {len(self.data)} bytes > {max_bytes}")
            return self.data
        if self.path is None:
            raise RecordError("missing_image", "image has neither bytes nor a path")
        return read_regular_file(self.path, max_bytes)


_READ_CHUNK = 1 << 20


def _not_regular(path: str, mode: int) -> RecordError:
    kind = ("directory" if stat.S_ISDIR(mode) else "character device" if stat.S_ISCHR(mode) else
            "block device" if stat.S_ISBLK(mode) else "FIFO" if stat.S_ISFIFO(mode) else
            "socket" if stat.S_ISSOCK(mode) else "special file")
    return RecordError("missing_image", f"{path} is a {kind}, not a regular file; image paths must name image files")


def read_regular_file(path: str, max_bytes: int) -> bytes:
    """Read a regular file of at most `max_bytes`, in bounded chunks.

    Devices (/dev/zero), FIFOs and directories are refused before they are opened
    (opening a FIFO blocks, reading /dev/zero never ends), and again with fstat on the
    opened descriptor, in case the path was swapped in between. Symlinks to regular
    files are followed: dataset caches (the Hugging Face hub's) are made of them, and
    they reach nothing an absolute path could not.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise RecordError("missing_image", f"cannot read {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        if st.st_size > max_bytes:
            raise RecordError("too_large", f"{path} is {st.st_size} bytes > {max_bytes} (data.max_member_bytes)")
        chunks, total = [], 0
        try:
            while chunk := f.read(min(_READ_CHUNK, max_bytes + 1 - total)):
                chunks.append(chunk)
                total += len(chunk)
                if total > max_bytes:  # the file grew, or is a /proc file with st_size 0
                    raise RecordError("too_large", f"{path} holds more than {max_bytes} bytes (data.max_member_bytes)")
        except OSError as e:
            raise RecordError("missing_image", f"cannot read {path}: {e.strerror}") from None
    return b"".join(chunks)


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


_PIL_FORMATS = ["PNG", "JPEG", "GIF", "BMP", "WEBP"]  # only the plugins for the formats shards may hold


def check_image_size(im, max_pixels: int) -> None:
    """Refuse an opened (not yet decoded) image whose header promises too many pixels or an odd shape.

    The header costs a few bytes; decoding a 12000x12000 1-bit PNG of 17 KB costs GBs.
    """
    width, height = im.size
    if width * height > max_pixels:
        raise RecordError("too_large", f"image is {width}x{height} = {width * height} pixels > {max_pixels} "
                                       "(data.max_image_pixels)")
    if min(width, height) < 1 or max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise RecordError("bad_image_shape", f"image is {width}x{height}: Qwen2.5-VL's processor refuses an "
                                             f"aspect ratio over {MAX_ASPECT_RATIO}")


def _open_checked(data: bytes, max_pixels: int, decode: "str | None"):
    """Open `data`, check its size from the header, then decode it as `decode` ("load": decode
    as for training and drop the result; "RGB": return the RGB image as displayed, see
    `pixels.displayed_rgb`; None: stop after the header).

    Pillow's decompression-bomb warning is an error here (scoped to this call), so a
    bomb is refused even when `max_pixels` is set above Pillow's own limit.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as im:
                check_image_size(im, max_pixels)
                if decode is None:
                    return None
                rgb = displayed_rgb(im)
                return rgb if decode == "RGB" else None
        except RecordError:
            raise
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise RecordError("too_large", f"image refused as a decompression bomb: {e}") from None
        except Exception as e:  # PIL raises many types for bad data
            raise RecordError("corrupt_image", f"image does not decode: {e}") from None


def check_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, decode: bool = True) -> str:
    """Verify that `data` is an image of at most `max_pixels`, decoding it unless not `decode`; return its extension."""
    ext = image_extension(data)
    _open_checked(data, max_pixels, "load" if decode else None)
    return ext


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS):
    """Decode encoded bytes to an RGB PIL image (the processor's input), refusing more than `max_pixels`."""
    return _open_checked(data, max_pixels, "RGB")


# ----------------------------------------------------------------------------- text checks (ilvr-prepare)

# Rows that training would skip are skipped and counted once, at prepare, before any image is read: a question
# holding a control token (every special token of the Qwen2 / Qwen2.5-VL tokenizers and the latent tokens has
# the form <|name|>; prepare has no tokenizer, the encoder still checks the exact set), or more text than any
# data.max_length could hold (a token is at least one character), which training used to tokenize every epoch.
MAX_TEXT_CHARS = 1 << 20  # question + text steps of one record
CONTROL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")


def check_text(record: "Record", max_chars: int = MAX_TEXT_CHARS) -> None:
    """Raise RecordError ("too_long", "control_token") for text training would skip."""
    chars = len(record.question) + sum(len(s.text) for s in record.steps if s.kind == "text")
    if chars > max_chars:
        raise RecordError("too_long", f"record {record.id!r}: its text is {chars} characters, more than "
                                      f"{max_chars} (MAX_TEXT_CHARS, data_pipeline/records.py): longer than any data.max_length")
    found = sorted(set(CONTROL_TOKEN.findall(record.question)))
    if found:
        shown = ", ".join(found[:5]) + (f" (and {len(found) - 5} more)" if len(found) > 5 else "")
        raise RecordError("control_token", f"record {record.id!r}: the question holds control tokens {shown}; "
                                           "training would skip it")


# ----------------------------------------------------------------------------- shard form

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


def shard_key(index: int, record_id: str) -> str:
    """A WebDataset sample key: unique by `index`, readable by id, and free of dots
    (WebDataset splits file names at the first dot)."""
    return f"{index:09d}_{_KEY_UNSAFE.sub('-', record_id)[:80]}"


def record_to_sample(record: Record, index: int, verify_images: bool = True,
                     limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Encode `record` as a shard sample: metadata under "json", each image under its own name.

    Raises RecordError when an image is missing, does not decode, or is over a limit
    (file bytes, header pixels, sample bytes): the loader would refuse it anyway.
    Image headers are checked even without `verify_images`, which skips only the decode.
    """
    check_text(record)  # before any image is read: training would skip the record anyway
    sample: dict[str, Any] = {"__key__": shard_key(index, record.id)}
    total = 0

    def put(prefix: str, i: int, ref: ImageRef) -> str:
        nonlocal total
        data = ref.load(max_bytes=limits.max_member_bytes)
        total += len(data)
        if total > limits.max_sample_bytes:
            raise RecordError("too_large", f"record {record.id!r}: images total more than "
                                           f"{limits.max_sample_bytes} bytes (data.max_sample_bytes)")
        ext = check_image(data, limits.max_image_pixels, decode=verify_images)
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
    if "__error__" in sample:  # the shard reader refused it before reading its data
        reason, message = sample["__error__"]
        raise RecordError(reason, message)
    raw = sample.get("json")
    if raw is None:
        raise RecordError("malformed_record", f"sample {key} has no json metadata")
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError("malformed_record", f"sample {key}: metadata is not valid JSON ({e})") from None
    except RecursionError:
        raise RecordError("malformed_record", f"sample {key}: metadata is nested too deeply") from None
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
