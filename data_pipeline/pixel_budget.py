"""Pixel budgets: data.min_pixels / data.max_pixels, the processor's resize bounds, set from the config.

    apply_pixel_budget(processor.image_processor, cfg.data.min_pixels, cfg.data.max_pixels)

Qwen2.5-VL's image processor resizes every image (aspect kept, sides multiples of patch x merge)
so that its area lies in [shortest_edge, longest_edge] of its `size` (min_pixels / max_pixels in
older releases; LLaMA-Factory's image_min_pixels / image_max_pixels): that decides how many
vision tokens an image costs. Set here through the processor's public `size`, the bounds travel
with it into every checkpoint's processor/ and ilvr-export's output, so evaluation resizes as
training did. Not to be confused with data.max_image_pixels, a *skip* limit against hostile
files: an image whose header claims more pixels is never decoded (docs/reliability.md).
"""
from __future__ import annotations


def apply_pixel_budget(image_processor, min_pixels: int = 0, max_pixels: int = 0) -> "tuple[int, int]":
    """Set the resize bounds (0 keeps the processor's own); return the (min, max) now in effect.
    Raises ValueError naming the config field when the bounds cannot hold one merged patch."""
    from transformers.image_utils import SizeDict

    size = image_processor.size
    size = size if isinstance(size, SizeDict) else SizeDict(**size)
    low = min_pixels or size.shortest_edge
    high = max_pixels or size.longest_edge
    side = image_processor.patch_size * image_processor.merge_size
    if high < side * side:
        raise ValueError(f"data.max_pixels={high} is below one merged patch ({side}x{side} = {side * side} px) of "
                         "this processor; give at least that (Qwen2.5-VL's default is 12845056)")
    if low > high:
        raise ValueError(f"data.min_pixels={low} > data.max_pixels={high} (set or implied by the processor's "
                         "own bounds): the resize bounds must satisfy min <= max")
    if min_pixels or max_pixels:
        image_processor.size = SizeDict(shortest_edge=low, longest_edge=high)
    return low, high
