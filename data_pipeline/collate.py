"""Batches of EncodedSamples: right-padded rows, or all samples packed into one row.

Both forms concatenate the images of the batch in sample order (the vision tower takes
them flat, with one grid row per image), keep the helper images apart the same way, and
give one row per latent segment in `latent_segments`:
(batch row, index of its first pad in that row, K, index of its helper image among the
batch's concatenated helpers). Packing avoids padding waste; its sequences are separated
by `cu_seqlens` (for varlen attention) and restarting `position_ids`, never by a mask.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from data_pipeline.encode import IGNORE_INDEX, EncodedSample


def _check(samples: Sequence[EncodedSample]) -> None:
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    for s in samples:
        if s.latent_segments.shape[0] != s.num_helpers:
            raise ValueError(f"sample {s.id!r}: {s.latent_segments.shape[0]} latent segments, {s.num_helpers} helpers")


def _image_fields(samples: Sequence[EncodedSample]) -> dict:
    """Images and helper images of all samples concatenated in order, with per-sample counts."""
    return {
        "pixel_values": torch.cat([s.pixel_values for s in samples]),
        "image_grid_thw": torch.cat([s.image_grid_thw for s in samples]),
        "helper_pixel_values": torch.cat([s.helper_pixel_values for s in samples]),
        "helper_image_grid_thw": torch.cat([s.helper_image_grid_thw for s in samples]),
        "num_images": torch.tensor([s.num_images for s in samples], dtype=torch.long),
        "num_helpers": torch.tensor([s.num_helpers for s in samples], dtype=torch.long),
        "ids": [s.id for s in samples],
    }


def _segments(samples: Sequence[EncodedSample], rows: Sequence[int], offsets: Sequence[int]) -> torch.Tensor:
    """[S_total, 4] rows (batch row, first pad index, K, global helper index)."""
    parts, helper_base = [], 0
    for sample, row, offset in zip(samples, rows, offsets):
        seg = sample.latent_segments
        n = seg.shape[0]
        parts.append(torch.stack([
            torch.full((n,), row, dtype=torch.long),
            seg[:, 0] + offset,
            seg[:, 1],
            torch.arange(helper_base, helper_base + n, dtype=torch.long),
        ], dim=1))  # fmt: skip
        helper_base += n
    return torch.cat(parts) if parts else torch.zeros(0, 4, dtype=torch.long)


def collate_padded(samples: Sequence[EncodedSample], pad_token_id: int) -> dict:
    """Right-pad to the longest sample: input_ids/attention_mask/labels/mm_token_type_ids [B, T_max]."""
    _check(samples)
    batch, t_max = len(samples), max(s.length for s in samples)
    input_ids = torch.full((batch, t_max), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, t_max), dtype=torch.long)
    labels = torch.full((batch, t_max), IGNORE_INDEX, dtype=torch.long)
    mm_token_type_ids = torch.zeros((batch, t_max), dtype=torch.long)
    for row, s in enumerate(samples):
        n = s.length
        input_ids[row, :n] = s.input_ids
        attention_mask[row, :n] = 1
        labels[row, :n] = s.labels
        mm_token_type_ids[row, :n] = s.mm_token_type_ids
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "mm_token_type_ids": mm_token_type_ids,
        "latent_segments": _segments(samples, range(batch), [0] * batch),
        **_image_fields(samples),
    }


def collate_packed(samples: Sequence[EncodedSample], pad_token_id: int, max_tokens: int | None = None) -> dict:
    """Concatenate all samples into one row [1, sum(T)], with no padding.

    `position_ids` restart at 0 for each sample, `cu_seqlens` (int32, [n+1]) holds the
    sample boundaries and `max_seqlen` the longest sample, as varlen attention kernels take
    them. Each sample's first label is -100 so no token is predicted across a boundary.
    `max_tokens`, when given, is a budget: a larger pack raises ValueError. `pad_token_id`
    is accepted for symmetry with `collate_padded`; a pack has no padding to fill.
    """
    del pad_token_id
    _check(samples)
    lengths = [s.length for s in samples]
    total = sum(lengths)
    if max_tokens is not None and total > max_tokens:
        raise ValueError(f"packing {len(samples)} samples needs {total} tokens > max_tokens {max_tokens}")
    labels = []
    for s in samples:
        sample_labels = s.labels.clone()
        sample_labels[0] = IGNORE_INDEX
        labels.append(sample_labels)
    cu_seqlens = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    return {
        "input_ids": torch.cat([s.input_ids for s in samples]).unsqueeze(0),
        "labels": torch.cat(labels).unsqueeze(0),
        "mm_token_type_ids": torch.cat([s.mm_token_type_ids for s in samples]).unsqueeze(0),
        "position_ids": torch.cat([torch.arange(n, dtype=torch.long) for n in lengths]).unsqueeze(0),
        "cu_seqlens": cu_seqlens,
        "max_seqlen": max(lengths),
        "latent_segments": _segments(samples, [0] * len(samples), cu_seqlens[:-1].tolist()),
        **_image_fields(samples),
    }


def split_packed(batch: dict) -> list[dict]:
    """Undo packing for the token fields: one dict of input_ids/labels/mm_token_type_ids per sample."""
    bounds = batch["cu_seqlens"].tolist()
    return [
        {key: batch[key][0, a:b] for key in ("input_ids", "labels", "mm_token_type_ids", "position_ids")}
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
