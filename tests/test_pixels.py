"""Images are decoded as viewers draw them: 16-bit samples scaled (not clipped), EXIF orientation applied.

Both cases go through the one decode the data path has (`records.decode_image`), in
ilvr-prepare's check (`record_to_sample`), and through `encode_prompt`, which the loader
(`encode_record`) and evaluation share.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.encode import encode_prompt
from data_pipeline.records import ImageRef, Record, check_image, decode_image, record_to_sample, sample_to_record

SIDE = 256


def gradient_16_bit() -> tuple[bytes, np.ndarray]:
    """A 16-bit grayscale PNG running over the full 0..65535 range, and its values."""
    values = np.arange(SIDE * SIDE, dtype=np.uint32).reshape(SIDE, SIDE).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")  # really 16-bit on disk
    return buf.getvalue(), values


def as_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_16_bit_grayscale_png_is_scaled_to_8_bits_not_clipped():
    data, values = gradient_16_bit()
    assert check_image(data) == "png"  # prepare's check decodes it the same way
    rgb = np.asarray(decode_image(data))
    expected = np.round(values / 257).astype(np.uint8)
    assert rgb.shape == (SIDE, SIDE, 3)
    for channel in range(3):
        assert np.array_equal(rgb[..., channel], expected)
    assert (rgb == 255).mean() < 0.01  # was 99.6% white


def record_with_image(data: bytes) -> Record:
    return Record(id="r0", task="test", question="<image>what is shown?", images=[ImageRef(data=data)], steps=[])


def encoded_pixels(tiny, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """The processor's input for `data` after a trip through a shard sample, as the loader and evaluation see it."""
    record = sample_to_record(record_to_sample(record_with_image(data), 0))
    prompt = encode_prompt(record, tiny[0])
    return prompt.pixel_values, prompt.image_grid_thw


def test_16_bit_png_reaches_the_model_like_its_8_bit_version(tiny):
    data, values = gradient_16_bit()
    eight_bit = as_png(np.round(values / 257).astype(np.uint8))
    pixels, grid = encoded_pixels(tiny, data)
    want_pixels, want_grid = encoded_pixels(tiny, eight_bit)
    assert torch.equal(grid, want_grid)
    assert torch.equal(pixels, want_pixels)


def phone_photo(orientation: int) -> tuple[bytes, np.ndarray]:
    """A 96x48 JPEG stored sideways with EXIF `orientation`, and the picture as it is meant to be seen."""
    shown = np.zeros((96, 48, 3), dtype=np.uint8)  # portrait: red top half, blue bottom half
    shown[:48] = (255, 0, 0)
    shown[48:] = (0, 0, 255)
    # orientation 6 means: rotate 90 degrees clockwise to display, so the file holds it turned counter-clockwise
    stored = np.rot90(shown, k=1) if orientation == 6 else shown
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(stored)).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue(), shown


@pytest.mark.parametrize("orientation", [1, 6])
def test_exif_orientation_is_applied_as_viewers_do(orientation):
    data, shown = phone_photo(orientation)
    rgb = np.asarray(decode_image(data)).astype(int)
    assert rgb.shape == shown.shape  # (96, 48): portrait, as displayed
    assert np.abs(rgb - shown).mean() < 8  # JPEG noise only; the wrong orientation is ~128 off


def test_exif_orientation_reaches_the_model(tiny):
    data, shown = phone_photo(6)
    pixels, grid = encoded_pixels(tiny, data)
    want_pixels, want_grid = encoded_pixels(tiny, as_png(shown))
    assert torch.equal(grid, want_grid)  # height and width as displayed
    assert (pixels - want_pixels).abs().mean() < 0.1  # JPEG noise; sideways it is ~1
