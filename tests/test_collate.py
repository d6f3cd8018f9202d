"""Padded and packed batches: shapes, padding, masks, latent segment rows, packing boundaries."""
from __future__ import annotations

import pytest
import torch

from data_pipeline.collate import collate_packed, collate_padded, split_packed
from data_pipeline.encode import IGNORE_INDEX, encode_record, patch_dim
from data_pipeline.records import Record, Step
from tests.factories import vsp_like_record

K = 3


@pytest.fixture(scope="module")
def samples(tiny):
    """Three samples of different lengths: 2 images + 3 latents, 1 image + 1 latent, text only."""
    processor, latent = tiny
    records = [
        vsp_like_record(n_images=2, n_latent=3, rid="a"),
        vsp_like_record(n_images=1, n_latent=1, rid="b", sizes=(256,)),
        Record(id="c", task="x", question="Say hi.", images=[], steps=[Step.of_text("Hi.")]),
    ]
    return [encode_record(r, processor, latent, latent_size=K, max_length=4096) for r in records]


def check_segments(batch, samples, latent, row_of, offset_of):
    """Every segment row points at K pads framed by start/end, and at its own helper image."""
    ids = batch["input_ids"]
    helpers_per_sample = [s.num_helpers for s in samples]
    assert batch["latent_segments"].shape == (sum(helpers_per_sample), 4)
    seen = 0
    for i, s in enumerate(samples):
        for j, (pad, k) in enumerate(s.latent_segments.tolist()):
            row, first, kk, helper = batch["latent_segments"][seen].tolist()
            assert (row, first, kk) == (row_of(i), pad + offset_of(i), k)
            assert ids[row, first - 1] == latent.start and ids[row, first + k] == latent.end
            assert (ids[row, first : first + k] == latent.pad).all()
            assert torch.equal(batch["helper_image_grid_thw"][helper], s.helper_image_grid_thw[j])
            seen += 1


def check_images(batch, samples, width):
    assert torch.equal(batch["pixel_values"], torch.cat([s.pixel_values for s in samples]))
    assert batch["pixel_values"].shape[1] == width
    assert torch.equal(batch["image_grid_thw"], torch.cat([s.image_grid_thw for s in samples]))
    assert torch.equal(batch["helper_pixel_values"], torch.cat([s.helper_pixel_values for s in samples]))
    assert batch["num_images"].tolist() == [2, 1, 0] and batch["num_helpers"].tolist() == [3, 1, 0]
    assert batch["ids"] == ["a", "b", "c"]


def test_padded(tiny, samples):
    processor, latent = tiny
    pad_id = processor.tokenizer.pad_token_id
    batch = collate_padded(samples, pad_token_id=pad_id)
    lengths = [s.length for s in samples]
    assert batch["input_ids"].shape == (3, max(lengths))
    for key in ("attention_mask", "labels", "mm_token_type_ids"):
        assert batch[key].shape == batch["input_ids"].shape
    for row, (s, n) in enumerate(zip(samples, lengths)):
        assert torch.equal(batch["input_ids"][row, :n], s.input_ids)
        assert torch.equal(batch["labels"][row, :n], s.labels)
        assert (batch["input_ids"][row, n:] == pad_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["mm_token_type_ids"][row, n:] == 0).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
    check_segments(batch, samples, latent, row_of=lambda i: i, offset_of=lambda i: 0)
    check_images(batch, samples, patch_dim(processor.image_processor))


def test_packed(tiny, samples):
    processor, latent = tiny
    batch = collate_packed(samples, pad_token_id=processor.tokenizer.pad_token_id)
    lengths = [s.length for s in samples]
    total = sum(lengths)
    assert batch["input_ids"].shape == (1, total) and batch["labels"].shape == (1, total)
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"].tolist() == [0, lengths[0], lengths[0] + lengths[1], total]
    assert batch["max_seqlen"] == max(lengths)
    starts = batch["cu_seqlens"][:-1].tolist()
    for start, n in zip(starts, lengths):
        assert batch["position_ids"][0, start : start + n].tolist() == list(range(n))
        assert batch["labels"][0, start] == IGNORE_INDEX  # nothing predicted across a boundary
    check_segments(batch, samples, latent, row_of=lambda i: 0, offset_of=lambda i: starts[i])
    check_images(batch, samples, patch_dim(processor.image_processor))
    for s, part in zip(samples, split_packed(batch)):
        assert torch.equal(part["input_ids"], s.input_ids)
        assert torch.equal(part["mm_token_type_ids"], s.mm_token_type_ids)
        assert torch.equal(part["labels"][1:], s.labels[1:]) and part["labels"][0] == IGNORE_INDEX


def test_packed_respects_the_token_budget(samples):
    total = sum(s.length for s in samples)
    assert collate_packed(samples, 0, max_tokens=total)["input_ids"].shape == (1, total)
    with pytest.raises(ValueError, match="max_tokens"):
        collate_packed(samples, 0, max_tokens=total - 1)


def test_batches_without_images_or_helpers(tiny, samples):
    width = patch_dim(tiny[0].image_processor)
    for batch in (collate_padded(samples[2:], 0), collate_packed(samples[2:], 0)):
        assert batch["pixel_values"].shape == (0, width) and batch["helper_pixel_values"].shape == (0, width)
        assert batch["image_grid_thw"].shape == (0, 3) and batch["helper_image_grid_thw"].shape == (0, 3)
        assert batch["latent_segments"].shape == (0, 4) and batch["latent_segments"].dtype == torch.long


def test_empty_batch_is_refused():
    with pytest.raises(ValueError):
        collate_padded([], 0)
