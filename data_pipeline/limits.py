"""Size limits on the data path, so that one hostile or careless file costs a counted skip, not the job.

Every limit is checked before the bytes or pixels it bounds are read or decoded: image
pixels from the image header, tar members from their tar header, files from `fstat`.
What is over a limit is skipped and counted as "too_large" (docs/reliability.md, "Data path").
"""
from __future__ import annotations

from dataclasses import dataclass

# Qwen2.5-VL's processor downsizes anything above 12.8 M pixels (max_pixels 28*28*16384),
# so 40 M keeps every sane photo (a 7000x5000 DSLR frame) and refuses the bombs.
MAX_IMAGE_PIXELS = 40_000_000
MAX_MEMBER_BYTES = 64 << 20  # one encoded image (or an image file read by ilvr-prepare)
MAX_SAMPLE_BYTES = 256 << 20  # all members of one sample together
MAX_JSON_BYTES = 8 << 20  # a sample's metadata; it expands ~20x when parsed
MAX_HEADER_BYTES = 1 << 20  # GNU long names and pax headers, which tarfile reads whole into memory
MAX_ASPECT_RATIO = 200  # Qwen2.5-VL's processor raises ValueError beyond this
# a JSONL row of ilvr-prepare's input: a whole sample as base64 (Zebra-CoT embeds images), plus its text
MAX_LINE_BYTES = MAX_SAMPLE_BYTES * 4 // 3 + MAX_JSON_BYTES


@dataclass(frozen=True)
class Limits:
    """The configurable limits (data.max_image_pixels, data.max_member_bytes, data.max_sample_bytes)."""

    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_member_bytes: int = MAX_MEMBER_BYTES
    max_sample_bytes: int = MAX_SAMPLE_BYTES

    def __post_init__(self) -> None:
        for name in ("max_image_pixels", "max_member_bytes", "max_sample_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name}={value!r} must be a positive integer")
        if self.max_sample_bytes < self.max_member_bytes:
            raise ValueError(f"data.max_sample_bytes={self.max_sample_bytes} must be >= "
                             f"data.max_member_bytes={self.max_member_bytes}")

    @staticmethod
    def from_config(data: object) -> "Limits":
        """The limits a DataConfig-like object sets; fields it lacks keep their defaults."""
        default = Limits()
        return Limits(**{name: getattr(data, name, getattr(default, name))
                         for name in ("max_image_pixels", "max_member_bytes", "max_sample_bytes")})


DEFAULT_LIMITS = Limits()
