"""Decoded images as an image viewer shows them: EXIF orientation applied, 16-bit samples scaled to 8.

Pillow's `Image.open` ignores EXIF orientation, so a phone photo with orientation 6 would
be trained on lying on its side. And `convert("RGB")` clips a 16-bit grayscale PNG
("I;16") instead of scaling it: a full-range gradient came out 99.6% white. Every decode
on the data path (ilvr-prepare's check, the loader, evaluation) goes through
`displayed_rgb`, so what prepare accepts is what training and evaluation see.
"""
from __future__ import annotations

import numpy as np

# modes whose samples run 0..65535: PNG 16-bit grayscale opens as "I;16" (older Pillow: "I")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def apply_orientation(im):
    """`im` turned the way its EXIF orientation says (Pillow's `ImageOps.exif_transpose`), else `im`."""
    from PIL import ImageOps

    orientation = im.getexif().get(0x0112)  # ExifTags.Base.Orientation
    if orientation in (None, 1):
        return im  # exif_transpose would copy the image for nothing
    return ImageOps.exif_transpose(im)


def to_8_bit(im):
    """A 16-bit grayscale image scaled to "L" (v * 255 / 65535, rounded); other modes as they are."""
    from PIL import Image

    if im.mode not in _SIXTEEN_BIT:
        return im
    values = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))


def displayed_rgb(im):
    """The opened image `im`, decoded, as an RGB image oriented and scaled as viewers show it."""
    return to_8_bit(apply_orientation(im)).convert("RGB")  # a copy, alive after the file closes
