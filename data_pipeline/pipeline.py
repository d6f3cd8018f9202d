"""The training data pipeline assembled from its settings: shards -> loader -> encoded, collated batches.

The settings are any object with the fields of `DataSettings` (the trainer passes its config's `data`
section, ilvr.config.DataConfig); the data pipeline imports nothing of the trainer's."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

from data_pipeline.collate import collate_packed, collate_padded
from data_pipeline.encode import EncodedSample, encode_record
from data_pipeline.latent_tokens import LatentTokenIds
from data_pipeline.limits import MAX_IMAGE_PIXELS, Limits
from data_pipeline.loader import StreamingLoader, build_loader
from data_pipeline.records import Record
from data_pipeline.shards import expand_shards, shard_sample_counts


class DataSettings(Protocol):
    """What build_train_loader reads (the trainer's `data` config section has these fields and more)."""

    train_shards: str  # brace pattern, a comma list, or a shard dir
    processor: str  # local HF processor directory, used when no processor is passed
    batch_size: int
    num_workers: int
    shuffle_buffer: int
    mode: str  # "exact" or "resampled"
    samples_per_epoch: int
    max_length: int
    packing: bool
    max_skip_fraction: float
    seed: int
    # optional: max_image_pixels, max_member_bytes, max_sample_bytes (Limits.from_config; defaults otherwise)


@dataclass
class RecordEncoder:
    """Record -> EncodedSample with fixed settings (a plain object, so worker processes can receive it)."""

    processor: Any
    latent_ids: LatentTokenIds
    latent_size: int
    max_length: int
    max_image_pixels: int = MAX_IMAGE_PIXELS

    def __call__(self, record: Record) -> EncodedSample:
        return encode_record(record, self.processor, self.latent_ids, self.latent_size, self.max_length,
                             self.max_image_pixels)


@dataclass
class BatchCollator:
    """List of EncodedSamples -> one padded or packed batch."""

    pad_token_id: int
    packing: bool = False

    def __call__(self, samples: list[EncodedSample]) -> dict[str, Any]:
        if self.packing:
            return collate_packed(samples, self.pad_token_id)
        return collate_padded(samples, self.pad_token_id)


def build_train_loader(data: DataSettings, latent_size: int, rank: int, world_size: int,
                       processor: Any = None, latent_ids: "LatentTokenIds | None" = None,
                       shards: "str | None" = None) -> StreamingLoader:
    """The per-rank training loader described by `data` (processor loaded from data.processor if not given)."""
    if processor is None:
        from data_pipeline.tiny_processor import load_processor

        processor, latent_ids = load_processor(data.processor)
    elif latent_ids is None:
        latent_ids = LatentTokenIds.from_tokenizer(processor.tokenizer)
    # the tokenizer's own thread pool does not survive fork into loader workers
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    urls = expand_shards(shards or data.train_shards, must_exist=True)
    limits = Limits.from_config(data)  # data.max_image_pixels / max_member_bytes / max_sample_bytes, when set
    encoder = RecordEncoder(processor, latent_ids, latent_size, data.max_length, limits.max_image_pixels)
    collator = BatchCollator(processor.tokenizer.pad_token_id, data.packing)
    return build_loader(urls, shard_sample_counts(urls), encoder, collator, rank=rank, world_size=world_size,
                        batch_size=data.batch_size, num_workers=data.num_workers, mode=data.mode,
                        shuffle_buffer=data.shuffle_buffer, seed=data.seed, samples_per_epoch=data.samples_per_epoch,
                        max_skip_fraction=data.max_skip_fraction, limits=limits)
