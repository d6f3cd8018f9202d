"""Benchmark records from shards, read in order, with every unusable sample counted by reason.

Evaluation reads its shards whole and in manifest order (no shuffling, no epochs), so the
same shards always give the same records in the same order; that order decides each
rank's slice. A sample that cannot be decoded or a shard that breaks off is skipped,
logged and counted (`skipped` in the metrics), never silently dropped.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from data_pipeline.records import Record, RecordError, sample_to_record
from data_pipeline.shard_reader import ShardReadError, read_samples
from data_pipeline.shards import expand_shards

log = logging.getLogger(__name__)


@dataclass
class BenchmarkData:
    records: list[Record]
    skipped: Counter = field(default_factory=Counter)

    def by_id(self) -> dict[str, Record]:
        return {r.id: r for r in self.records}


def load_records(shards: str, limit: int | None = None) -> BenchmarkData:
    """All records of `shards` (a dir, manifest, brace pattern or comma list), first `limit` only if given."""
    data = BenchmarkData(records=[])
    seen: set[str] = set()
    for url in expand_shards(shards, must_exist=True):
        try:
            for sample in read_samples(url):
                try:
                    record = sample_to_record(sample)
                except RecordError as e:
                    data.skipped[e.reason] += 1
                    log.warning("skipping a sample of %s: %s", url, e)
                    continue
                if record.id in seen:
                    raise ValueError(f"record id {record.id!r} appears twice in {shards}: ids must be unique "
                                     "(ilvr-prepare rejects duplicates; were two shard sets mixed?)")
                seen.add(record.id)
                data.records.append(record)
                if limit is not None and len(data.records) >= limit:
                    return data
        except ShardReadError as e:
            data.skipped["corrupt_shard"] += 1
            log.warning("shard %s is corrupt or truncated; its remaining samples are skipped: %s", url, e)
    if not data.records:
        raise ValueError(f"{shards} holds no usable records (skipped: {dict(data.skipped) or 'none'})")
    return data
