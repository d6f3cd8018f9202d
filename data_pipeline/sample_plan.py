"""The sample plan of data_pipeline/loader.py, as pure functions of the shards' sample counts: the epoch's
shard order, its index space cut into equal slices per rank x worker, sets of samples as sorted ranges,
and the seeded shuffle buffer (docs/data.md, "Streaming")."""
from __future__ import annotations

import bisect
import hashlib
import random
from typing import Any, Iterable, Iterator

Range = tuple[int, int, int]  # (shard index, first sample, end sample)


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from integers, the same in every process and Python version."""
    return int.from_bytes(hashlib.sha256(repr(tuple(parts)).encode()).digest()[:8], "little")


def epoch_order(counts: list[int], seed: int, epoch: int) -> list[Range]:
    """The epoch's samples in plan order: whole shards, shuffled by (seed, epoch)."""
    order = list(range(len(counts)))
    random.Random(derive_seed(seed, epoch, 0xD47A)).shuffle(order)
    return [(shard, 0, counts[shard]) for shard in order if counts[shard] > 0]


def split_ranges(universe: list[Range], num_slices: int) -> list[list[Range]]:
    """Cut the concatenation of `universe` into `num_slices` contiguous, near-equal slices."""
    total = sum(b - a for _, a, b in universe)
    bounds = [total * i // num_slices for i in range(num_slices + 1)]
    slices: list[list[Range]] = [[] for _ in range(num_slices)]
    offset = 0
    for shard, a, b in universe:
        n = b - a
        s = max(0, bisect.bisect_right(bounds, offset) - 1)
        while s < num_slices and bounds[s] < offset + n:
            lo, hi = max(bounds[s], offset), min(bounds[s + 1], offset + n)
            if lo < hi:
                slices[s].append((shard, a + lo - offset, a + hi - offset))
            s += 1
        offset += n
    return slices


def plan_slices(counts: list[int], num_slices: int, seed: int, epoch: int) -> list[list[Range]]:
    """Cut the epoch's shuffled concatenation of shards into `num_slices` contiguous, near-equal slices."""
    return split_ranges(epoch_order(counts, seed, epoch), num_slices)


def as_ranges(samples: Iterable[tuple[int, int]]) -> list[Range]:
    """(shard, index) pairs -> sorted, merged ranges."""
    out: list[list[int]] = []
    for shard, i in sorted(set(map(tuple, samples))):
        if out and out[-1][0] == shard and out[-1][2] == i:
            out[-1][2] = i + 1
        else:
            out.append([shard, i, i + 1])
    return [tuple(r) for r in out]


def subtract_ranges(universe: list[Range], done: Iterable[Range]) -> list[Range]:
    """`universe` without the samples in `done`, in universe order."""
    by_shard: dict[int, list[tuple[int, int]]] = {}
    for shard, a, b in done:
        by_shard.setdefault(shard, []).append((a, b))
    for shard, spans in by_shard.items():
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(spans):
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        by_shard[shard] = merged
    out: list[Range] = []
    for shard, a, b in universe:
        spans = by_shard.get(shard, [])
        k = max(0, bisect.bisect_left(spans, (a, a)) - 1)  # the span before may reach into [a, b)
        cur = a
        while k < len(spans) and spans[k][0] < b:
            lo, hi = spans[k]
            if hi > cur:
                if lo > cur:
                    out.append((shard, cur, min(lo, b)))
                cur = max(cur, hi)
            k += 1
        if cur < b:
            out.append((shard, cur, b))
    return out


def range_size(ranges: Iterable[Range]) -> int:
    return sum(b - a for _, a, b in ranges)


def per_worker(total: int, slots: int, batch_size: int) -> int:
    """T: ceil(total / slots) rounded up to a multiple of the batch size (at least one batch)."""
    return max(1, -(-(-(-total // slots)) // batch_size)) * batch_size


def shuffled(items: Iterable[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream with a buffer of `buffer_size` items (0 or 1: keep the order)."""
    if buffer_size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        i = rng.randrange(buffer_size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf
