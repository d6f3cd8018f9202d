"""Streaming training batches from WebDataset shards, equal per rank, resumable exactly.

Why not `wds.WebDataset(...)` as is: with uneven shards its ranks get unequal sample
counts (ZeRO-3 then deadlocks in a collective), and its position cannot be restored.
So the plan is made here, from the manifest's per-shard counts:

* exact mode: each epoch shuffles the shard order (seed, epoch), concatenates the
  shards into one index space and cuts it into world_size x workers contiguous
  slices (split by node and by worker). Every worker emits the same number T of
  samples, a multiple of the batch size: a worker whose slice is short (uneven split,
  or samples skipped as bad) tops up by reading its own slice again, so each sample
  is seen once per epoch and a few are repeated to even out the counts.
* resampled mode: each worker draws shards with replacement, forever; an epoch is
  `samples_per_epoch` samples per rank.

Each worker shuffles its stream with a buffer seeded by (seed, epoch, rank, worker).
Batches carry the worker's stream position, so `state_dict()` records exactly what
the training loop has consumed; `load_state_dict()` makes each worker replay its
stream up to that point (reading tar headers and JSON only) and continue, giving the
batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.limits import DEFAULT_LIMITS, Limits
from data_pipeline.records import Record, RecordError, sample_to_record
from data_pipeline.shard_reader import ShardReadError, read_samples
from data_pipeline.skips import SkipCounter

log = logging.getLogger(__name__)

Range = tuple[int, int, int]  # (shard index, first sample, end sample)


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from integers, the same in every process and Python version."""
    return int.from_bytes(hashlib.sha256(repr(tuple(parts)).encode()).digest()[:8], "little")


def plan_slices(counts: list[int], num_slices: int, seed: int, epoch: int) -> list[list[Range]]:
    """Cut the epoch's shuffled concatenation of shards into `num_slices` contiguous, near-equal slices."""
    order = list(range(len(counts)))
    random.Random(derive_seed(seed, epoch, 0xD47A)).shuffle(order)
    total = sum(counts)
    bounds = [total * i // num_slices for i in range(num_slices + 1)]
    slices: list[list[Range]] = [[] for _ in range(num_slices)]
    offset = 0
    for shard in order:
        n = counts[shard]
        for s in range(num_slices):
            lo, hi = max(bounds[s], offset), min(bounds[s + 1], offset + n)
            if lo < hi:
                slices[s].append((shard, lo - offset, hi - offset))
        offset += n
    return slices


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


@dataclass
class StreamSpec:
    """Everything a worker needs to produce its part of an epoch (plain data, cheap to send to workers)."""

    urls: list[str]
    counts: list[int]
    mode: str  # "exact" | "resampled"
    rank: int
    world_size: int
    num_workers: int  # logical workers per rank (>= 1)
    batch_size: int
    shuffle_buffer: int
    seed: int
    samples_per_worker: int  # T, a multiple of batch_size
    limits: Limits = DEFAULT_LIMITS  # member and sample byte caps for the shard reader


class _SliceStream:
    """The raw sample stream of one (rank, worker, epoch), with skip accounting for unreadable data."""

    def __init__(self, spec: StreamSpec, epoch: int, worker: int, skips: SkipCounter):
        self.spec, self.epoch, self.worker, self.skips = spec, epoch, worker, skips
        self.rng = random.Random(derive_seed(spec.seed, epoch, spec.rank, worker))

    def _read_range(self, shard: int, start: int, stop: int, count_skips: bool = True) -> Iterator[dict]:
        url, got = self.spec.urls[shard], 0
        try:
            for sample in read_samples(url, start, stop, self.spec.limits):
                got += 1
                yield sample
        except ShardReadError as e:
            if count_skips:
                log.warning("skipping the unreadable rest of a shard: %s", e)
        if got < stop - start and count_skips:
            self.skips.skip("shard_read_error", f"{url}: {stop - start - got} of samples {start}..{stop} unreadable",
                            n=stop - start - got)

    def __iter__(self) -> Iterator[dict]:
        spec = self.spec
        if spec.mode == "exact":
            my_slice = plan_slices(spec.counts, spec.world_size * spec.num_workers, spec.seed, self.epoch)[
                spec.rank * spec.num_workers + self.worker]
            for pass_no in itertools.count():  # pass 0 is the epoch proper; later passes top up to T
                # bad samples are counted once per epoch, in pass 0
                pass_items = (s for r in my_slice for s in self._read_range(*r, count_skips=pass_no == 0))
                yield from shuffled(pass_items, spec.shuffle_buffer, self.rng)
                yield None  # pass boundary marker
        else:
            def draws() -> Iterator[dict]:
                while True:
                    shard = self.rng.randrange(len(spec.urls))
                    yield from self._read_range(shard, 0, spec.counts[shard])
            yield from shuffled(draws(), spec.shuffle_buffer, self.rng)


class ShardStream(IterableDataset):
    """The per-rank dataset: each DataLoader worker yields its slice's batches with their position."""

    def __init__(self, spec: StreamSpec, encode: Callable[[Record], Any], collate: Callable[[list], Any]):
        self.spec, self.encode, self.collate = spec, encode, collate
        self.epoch = 0
        self.positions: list[tuple[int, int]] = [(0, 0)] * spec.num_workers  # (raw items pulled, samples emitted)
        self.rotation = 0  # DataLoader worker j serves logical worker (j + rotation) % num_workers

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        loader_worker = info.id if info is not None else 0
        worker = (loader_worker + self.rotation) % self.spec.num_workers
        return self._batches(worker)

    def _batches(self, worker: int) -> Iterator[dict]:
        spec = self.spec
        skips = SkipCounter(max_fraction=1.0)  # the fraction is checked in the main process
        raw_pos, emitted = self.positions[worker]
        stream = iter(_SliceStream(spec, self.epoch, worker, skips))
        for _ in range(raw_pos):  # replay up to the saved position, decoding nothing
            next(stream)
        skips.reset()  # what the replay met was counted before the save
        batch: list[Any] = []
        valid_in_pass = 1 if emitted else 0
        topping_up = False  # in exact mode, past the first pass over the slice
        reported = (0, {})
        while emitted < spec.samples_per_worker:
            item = next(stream)
            raw_pos += 1
            if item is None:
                if valid_in_pass == 0:
                    raise RuntimeError(
                        f"rank {spec.rank} worker {worker}: no usable sample in its whole slice "
                        f"({skips.summary()}); the shards are unreadable or every record is bad")
                valid_in_pass, topping_up = 0, True
                continue
            try:
                sample = self.encode(sample_to_record(item))
            except RecordError as e:
                if not topping_up:
                    skips.skip(e.reason, f"{item.get('__url__')}:{item.get('__key__')}: {e}")
                continue
            if not topping_up:
                skips.ok()
            valid_in_pass += 1
            batch.append(sample)
            emitted += 1
            if len(batch) == spec.batch_size:
                seen, skipped = skips.seen - reported[0], dict(skips.skipped)
                delta = {k: v - reported[1].get(k, 0) for k, v in skipped.items() if v - reported[1].get(k, 0)}
                reported = (skips.seen, skipped)
                yield {"batch": self.collate(batch), "worker": worker, "position": (raw_pos, emitted),
                       "seen": seen, "skipped": delta}
                batch = []


class StreamingLoader:
    """Iterates one epoch of batches per `iter()` call; equal batch counts on every rank.

    `state_dict()` / `load_state_dict()` save and restore the position exactly (per rank).
    """

    def __init__(self, spec: StreamSpec, encode: Callable[[Record], Any], collate: Callable[[list], Any],
                 num_workers: int, max_skip_fraction: float = 0.05, prefetch_factor: int = 2):
        if spec.samples_per_worker % spec.batch_size:
            raise ValueError("samples_per_worker must be a multiple of batch_size")
        self.spec = spec
        self.dataset = ShardStream(spec, encode, collate)
        self.num_workers = num_workers  # DataLoader processes; 0 = in the main process
        self.prefetch_factor = prefetch_factor
        self.skips = SkipCounter(max_fraction=max_skip_fraction, what="training samples")
        self.consumed = 0  # batches of the current epoch handed to the caller

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    @property
    def batches_per_epoch(self) -> int:
        return self.spec.num_workers * self.spec.samples_per_worker // self.spec.batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[Any]:
        W = self.spec.num_workers
        self.dataset.rotation = self.consumed % W
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            persistent_workers=False)
        for item in loader:
            self.dataset.positions[item["worker"]] = item["position"]
            self.consumed += 1
            self.skips.merge(item["skipped"], item["seen"])
            self.skips.check()
            yield item["batch"]
        if self.consumed != self.batches_per_epoch:
            raise RuntimeError(f"epoch {self.epoch} ended after {self.consumed} of {self.batches_per_epoch} batches")
        self.dataset.epoch += 1
        self.dataset.positions = [(0, 0)] * W
        self.consumed = 0

    def batches(self) -> Iterator[Any]:
        """Batches forever, epoch after epoch."""
        while True:
            yield from self

    def state_dict(self) -> dict[str, Any]:
        s = self.spec
        return {"version": 1, "epoch": self.epoch, "consumed": self.consumed,
                "positions": [list(p) for p in self.dataset.positions],
                "seen": self.skips.seen, "skipped": dict(self.skips.skipped),
                "fingerprint": {"mode": s.mode, "world_size": s.world_size, "num_workers": s.num_workers,
                                "batch_size": s.batch_size, "seed": s.seed, "counts": list(s.counts),
                                "samples_per_worker": s.samples_per_worker}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = self.spec
        self.skips = SkipCounter(max_fraction=self.skips.max_fraction, what=self.skips.what)
        self.skips.merge(state.get("skipped", {}), state.get("seen", 0))
        self.dataset.epoch = int(state["epoch"])
        mine = {"mode": s.mode, "world_size": s.world_size, "num_workers": s.num_workers,
                "batch_size": s.batch_size, "seed": s.seed, "counts": list(s.counts),
                "samples_per_worker": s.samples_per_worker}
        if state.get("fingerprint") != mine:
            changed = sorted(k for k in mine if state.get("fingerprint", {}).get(k) != mine[k])
            log.warning("data loader settings changed since the checkpoint (%s): restarting epoch %d "
                        "from its beginning, so some samples of it will be seen twice", ", ".join(changed),
                        self.dataset.epoch)
            self.dataset.positions = [(0, 0)] * s.num_workers
            self.consumed = 0
            return
        self.dataset.positions = [tuple(p) for p in state["positions"]]
        self.consumed = int(state["consumed"])


def samples_per_worker(mode: str, total: int, world_size: int, workers: int, batch_size: int,
                       samples_per_epoch: int = 0) -> int:
    """T: samples each worker emits per epoch, a multiple of the batch size, equal on every rank."""
    per_worker = -(-total // (world_size * workers)) if mode == "exact" or not samples_per_epoch \
        else -(-samples_per_epoch // workers)
    return max(1, -(-per_worker // batch_size)) * batch_size


def make_stream_spec(urls: list[str], counts: list[int], *, mode: str, rank: int, world_size: int,
                     num_workers: int, batch_size: int, shuffle_buffer: int, seed: int,
                     samples_per_epoch: int = 0, limits: Limits = DEFAULT_LIMITS) -> StreamSpec:
    if not urls:
        raise ValueError("no shards to read")
    total = sum(counts)
    if total == 0:
        raise ValueError("the shards hold no samples")
    workers = max(1, num_workers)
    T = samples_per_worker(mode, total, world_size, workers, batch_size, samples_per_epoch)
    return StreamSpec(urls=urls, counts=counts, mode=mode, rank=rank, world_size=world_size, num_workers=workers,
                      batch_size=batch_size, shuffle_buffer=shuffle_buffer, seed=seed, samples_per_worker=T,
                      limits=limits)


def build_loader(urls: list[str], counts: list[int], encode: Callable[[Record], Any], collate: Callable[[list], Any],
                 *, rank: int, world_size: int, batch_size: int, num_workers: int = 0, mode: str = "exact",
                 shuffle_buffer: int = 0, seed: int = 0, samples_per_epoch: int = 0,
                 max_skip_fraction: float = 0.05, limits: Limits = DEFAULT_LIMITS) -> StreamingLoader:
    spec = make_stream_spec(urls, counts, mode=mode, rank=rank, world_size=world_size, num_workers=num_workers,
                            batch_size=batch_size, shuffle_buffer=shuffle_buffer, seed=seed,
                            samples_per_epoch=samples_per_epoch, limits=limits)
    return StreamingLoader(spec, encode, collate, num_workers=num_workers, max_skip_fraction=max_skip_fraction)
