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

Another rank x worker layout (elastic resume, docs/training.md "Elastic resume"): the
position cannot be replayed, so the rest of the interrupted epoch is re-planned. In exact
mode every old worker's stream is replayed to learn which samples it consumed
(`replay_consumed`); what the epoch has left (`remaining`: ranges in the epoch's order) is
cut into slices for the new layout as a whole epoch would be, with T' = ceil(left /
(ranks x workers)) per worker (`load_replanned`). Within the interrupted epoch no sample is
seen twice and none is skipped, except the top-up repeats that even out the new workers'
counts (as in any epoch). Resampled mode carries the epoch's sample budget over (statistical:
shards are drawn with replacement anyway). The next epoch is planned for the new layout.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.limits import DEFAULT_LIMITS, Limits
from data_pipeline.records import Record, RecordError, sample_to_record
from data_pipeline.sample_plan import (Range, as_ranges, derive_seed, epoch_order, per_worker, range_size, shuffled,
                                       split_ranges, subtract_ranges)
from data_pipeline.shard_reader import ShardReadError, read_samples
from data_pipeline.skips import SkipCounter

log = logging.getLogger(__name__)

SAMPLE_LOG_ENV = "ILVR_SAMPLE_LOG"  # debug/tests: append the samples of every consumed batch to <value>.rank<r>.jsonl


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


@dataclass
class Segment:
    """What part of an epoch the workers share out: the whole epoch (`universe` None, segment 0), or
    after an elastic re-plan what the epoch had left (`universe`: ranges in the epoch's order), with
    T = `samples_per_worker` for this layout. `segment` salts the shuffle seeds of re-planned parts."""

    samples_per_worker: int
    universe: "list[Range] | None" = None
    segment: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"samples_per_worker": self.samples_per_worker, "segment": self.segment,
                "universe": None if self.universe is None else [list(r) for r in self.universe]}

    @classmethod
    def from_json(cls, state: dict[str, Any], default_per_worker: int) -> "Segment":
        universe = state.get("universe")
        return cls(int(state.get("samples_per_worker", default_per_worker)),
                   None if universe is None else [tuple(int(v) for v in r) for r in universe],
                   int(state.get("segment", 0)))


class _SliceStream:
    """The raw sample stream of one (rank, worker, epoch), with skip accounting for unreadable data.

    Every item carries "__sample__": [shard, index in shard] (its identity); samples a read error made
    unreadable in the first pass are listed in `lost` (they were counted as skipped)."""

    def __init__(self, spec: StreamSpec, epoch: int, worker: int, skips: SkipCounter,
                 segment: "Segment | None" = None):
        self.spec, self.epoch, self.worker, self.skips = spec, epoch, worker, skips
        self.segment = segment or Segment(spec.samples_per_worker)
        salt = (self.segment.segment,) if self.segment.segment else ()  # segment 0: the seeds of before
        self.rng = random.Random(derive_seed(spec.seed, epoch, spec.rank, worker, *salt))
        self.lost: list[Range] = []
        self.top_up_only = False  # a re-planned part smaller than the workers: this one only repeats samples
        self.slice = self._my_slice() if spec.mode == "exact" else []

    def _read_range(self, shard: int, start: int, stop: int, count_skips: bool = True) -> Iterator[dict]:
        url, got, error = self.spec.urls[shard], 0, None
        try:
            for sample in read_samples(url, start, stop, self.spec.limits):
                sample["__sample__"] = [shard, start + got]
                got += 1
                yield sample
        except ShardReadError as e:
            error = e
            if count_skips:
                log.warning("skipping the unreadable rest of a shard: %s", e)
        if got < stop - start and count_skips:
            self.lost.append((shard, start + got, stop))
            if error is not None:
                self.skips.skip("shard_read_error", f"{url}: {stop - start - got} of samples {start}..{stop} "
                                f"unreadable ({error})", n=stop - start - got)
            else:  # the tar ended cleanly before the count the plan took from the manifest
                self.skips.skip("manifest_mismatch", f"{url} ends after {start + got} samples, but the manifest "
                                f"lists {self.spec.counts[shard]}: manifest and shards disagree; prepare again or "
                                "copy the shard set again", n=stop - start - got)
                log.warning("shard %s ends after %d samples; its manifest lists %d", url, start + got,
                            self.spec.counts[shard])

    def _my_slice(self) -> list[Range]:
        spec = self.spec
        universe = self.segment.universe
        if universe is None:
            universe = epoch_order(spec.counts, spec.seed, self.epoch)
        mine = split_ranges(universe, spec.world_size * spec.num_workers)[spec.rank * spec.num_workers + self.worker]
        if not mine and self.segment.universe is not None:
            self.top_up_only = True
            return universe
        return mine

    def __iter__(self) -> Iterator[dict]:
        spec = self.spec
        if spec.mode == "exact":
            my_slice = self.slice
            for pass_no in itertools.count():  # pass 0 is the epoch proper; later passes top up to T
                # bad samples are counted once per epoch, in pass 0
                counting = pass_no == 0 and not self.top_up_only
                pass_items = (s for r in my_slice for s in self._read_range(*r, count_skips=counting))
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
        self.segment = Segment(spec.samples_per_worker)  # the whole epoch, unless re-planned
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
        source = _SliceStream(spec, self.epoch, worker, skips, self.segment)
        stream = iter(source)
        for _ in range(raw_pos):  # replay up to the saved position, decoding nothing
            next(stream)
        skips.reset()  # what the replay met was counted before the save
        batch: list[Any] = []
        samples: list[list[int]] = []
        valid_in_pass = 1 if emitted else 0
        topping_up = source.top_up_only  # in exact mode, past the first pass over the slice
        reported = (0, {})
        while emitted < self.segment.samples_per_worker:
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
            samples.append(item["__sample__"])
            emitted += 1
            if len(batch) == spec.batch_size:
                seen, skipped = skips.seen - reported[0], dict(skips.skipped)
                delta = {k: v - reported[1].get(k, 0) for k, v in skipped.items() if v - reported[1].get(k, 0)}
                reported = (skips.seen, skipped)
                yield {"batch": self.collate(batch), "worker": worker, "position": (raw_pos, emitted),
                       "seen": seen, "skipped": delta, "samples": samples,
                       "examples": {k: skips.examples.get(k, "") for k in delta}}  # else "(e.g. )" in the error
                batch, samples = [], []


class StreamingLoader:
    """Iterates one epoch of batches per `iter()` call; equal batch counts on every rank.

    `state_dict()` / `load_state_dict()` save and restore the position exactly (per rank);
    `replay_consumed()` + `load_replanned()` carry it to another rank x worker layout.
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
        self.sample_log = os.environ.get(SAMPLE_LOG_ENV) or None

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    @property
    def batches_per_epoch(self) -> int:
        """Batches of the current epoch (of what is left of it, after a re-plan)."""
        return self.spec.num_workers * self.dataset.segment.samples_per_worker // self.spec.batch_size

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
            self.skips.merge(item["skipped"], item["seen"], item.get("examples"))
            self.skips.check()
            if self.sample_log:
                self._log_samples(item["samples"])
            yield item["batch"]
        if self.consumed != self.batches_per_epoch:
            raise RuntimeError(f"epoch {self.epoch} ended after {self.consumed} of {self.batches_per_epoch} batches")
        self._next_epoch()

    def _next_epoch(self) -> None:
        self.dataset.epoch += 1
        self.dataset.segment = Segment(self.spec.samples_per_worker)
        self.dataset.positions = [(0, 0)] * self.spec.num_workers
        self.consumed = 0

    def _log_samples(self, samples: list) -> None:
        """Debug record of what the caller consumed (`ILVR_SAMPLE_LOG`; tests check exactly-once with it)."""
        line = {"epoch": self.epoch, "segment": self.dataset.segment.segment, "samples": samples}
        with open(f"{self.sample_log}.rank{self.spec.rank}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def batches(self) -> Iterator[Any]:
        """Batches forever, epoch after epoch."""
        while True:
            yield from self

    # ------------------------------------------------------------------ state
    def _fingerprint(self) -> dict[str, Any]:
        s = self.spec
        return {"mode": s.mode, "world_size": s.world_size, "num_workers": s.num_workers,
                "batch_size": s.batch_size, "seed": s.seed, "counts": list(s.counts),
                "samples_per_worker": s.samples_per_worker, "shuffle_buffer": s.shuffle_buffer}

    def state_dict(self) -> dict[str, Any]:
        return {"version": 2, "epoch": self.epoch, "consumed": self.consumed,
                "positions": [list(p) for p in self.dataset.positions],
                "seen": self.skips.seen, "skipped": dict(self.skips.skipped),
                **self.dataset.segment.to_json(), "fingerprint": self._fingerprint()}

    def _changed(self, state: dict[str, Any], keys: Iterable[str]) -> list[str]:
        """Fingerprint keys that differ from `state`'s (a key a version-1 state lacks counts as unchanged
        only for shuffle_buffer, which it did not record)."""
        saved, mine = state.get("fingerprint", {}), self._fingerprint()
        return sorted(k for k in keys if saved.get(k, mine[k] if k == "shuffle_buffer" else None) != mine[k])

    def layout_changed(self, state: dict[str, Any]) -> bool:
        """Whether `state` was saved with another rank x worker layout (or batch size) on the same data:
        its position can only be carried over by a re-plan (replay_consumed + load_replanned)."""
        return bool(self._changed(state, ("world_size", "num_workers", "batch_size", "samples_per_worker"))) \
            and not self._changed(state, DATA_KEYS)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = self.spec
        self._restore_skips(state.get("skipped", {}), state.get("seen", 0))
        self.dataset.epoch = int(state["epoch"])
        changed = self._changed(state, self._fingerprint())
        if changed:
            log.warning("data loader settings changed since the checkpoint (%s): restarting epoch %d "
                        "from its beginning, so some samples of it will be seen twice", ", ".join(changed),
                        self.dataset.epoch)
            self.dataset.segment = Segment(s.samples_per_worker)
            self.dataset.positions = [(0, 0)] * s.num_workers
            self.consumed = 0
            return
        self.dataset.segment = Segment.from_json(state, s.samples_per_worker)
        self.dataset.positions = [tuple(p) for p in state["positions"]]
        self.consumed = int(state["consumed"])

    def _restore_skips(self, skipped: dict[str, int], seen: int) -> None:
        self.skips = SkipCounter(max_fraction=self.skips.max_fraction, what=self.skips.what)
        self.skips.merge(skipped, seen)

    # ------------------------------------------------------------------ another layout
    def _old_stream(self, state: dict[str, Any], rank: int, worker: int) -> _SliceStream:
        """The stream (rank, worker) of the layout `state` was saved with."""
        fp = state["fingerprint"]
        spec = dataclasses.replace(self.spec, rank=rank, world_size=int(fp["world_size"]),
                                   num_workers=int(fp["num_workers"]), batch_size=int(fp["batch_size"]),
                                   shuffle_buffer=int(fp.get("shuffle_buffer", self.spec.shuffle_buffer)),
                                   samples_per_worker=int(fp["samples_per_worker"]))
        segment = Segment.from_json(state, spec.samples_per_worker)
        return _SliceStream(spec, int(state["epoch"]), worker, SkipCounter(max_fraction=1.0), segment)

    def replay_consumed(self, state: dict[str, Any], rank: int, worker: int) -> list[Range]:
        """Exact mode: the samples old worker (rank, worker) had consumed or skipped (as ranges) at the
        save that wrote `state` (that rank's loader state). Reads its stream up to the saved position."""
        if self.spec.mode != "exact" or self._changed(state, DATA_KEYS):
            return []  # resampled mode carries a count; changed data restarts the epoch
        raw_pos = int(state["positions"][worker][0])
        stream = self._old_stream(state, rank, worker)
        pulled = []
        for item in itertools.islice(iter(stream), raw_pos):
            if item is not None:
                pulled.append(item["__sample__"])
        done = as_ranges(pulled)
        return done + [tuple(r) for r in stream.lost]

    def load_replanned(self, states: list[dict[str, Any]], done: "list[Range] | None" = None) -> None:
        """Continue the interrupted epoch on this loader's layout. `states`: every old rank's loader state,
        in rank order; `done`: in exact mode, the union of replay_consumed() over every old (rank, worker)."""
        self._check_old_states(states)
        first = states[0]
        epoch = int(first["epoch"])
        changed = self._changed(first, DATA_KEYS)
        if changed:  # as load_state_dict does for the same layout
            log.warning("data settings changed since the checkpoint (%s): restarting epoch %d from its beginning, "
                        "so some samples of it will be seen twice", ", ".join(changed), epoch)
            self.load_state_dict({**first, "consumed": 0})
            return
        seen = sum(int(st.get("seen", 0)) for st in states)
        skipped: dict[str, int] = {}
        for st in states:
            for k, v in st.get("skipped", {}).items():
                skipped[k] = skipped.get(k, 0) + int(v)
        share = self._share(seen, skipped)
        self._restore_skips(*share)
        self.dataset.epoch = epoch
        self.dataset.positions = [(0, 0)] * self.spec.num_workers
        self.consumed = 0
        left, universe = self._left(states, done)
        segment = 1 + max(int(st.get("segment", 0)) for st in states)
        slots = self.spec.world_size * self.spec.num_workers
        if left <= 0:
            log.info("data: epoch %d was finished at the checkpoint; the next one starts on the new layout", epoch)
            self._next_epoch()
            return
        self.dataset.segment = Segment(per_worker(left, slots, self.spec.batch_size), universe, segment)
        log.info("data: epoch %d re-planned for %d ranks x %d workers: %d samples left, %d per worker (%d batches "
                 "per rank)", epoch, self.spec.world_size, self.spec.num_workers, left,
                 self.dataset.segment.samples_per_worker, self.batches_per_epoch)

    def _check_old_states(self, states: list[dict[str, Any]]) -> None:
        fp = states[0].get("fingerprint", {})
        if len(states) != int(fp.get("world_size", -1)):
            raise ValueError(f"re-planning needs the loader state of every saved rank: got {len(states)}, the "
                             f"checkpoint was saved by {fp.get('world_size')} ranks")
        epochs = {int(st["epoch"]) for st in states}
        if len(epochs) != 1:
            raise ValueError(f"saved ranks disagree on the epoch ({sorted(epochs)}): a damaged checkpoint")

    def _left(self, states: list[dict[str, Any]], done: "list[Range] | None") -> tuple[int, "list[Range] | None"]:
        """(samples the epoch has left, their ranges in exact mode)."""
        first = states[0]
        if self.spec.mode == "exact":
            if done is None:
                raise ValueError("exact mode: pass the samples the old workers consumed (replay_consumed)")
            universe = Segment.from_json(first, 0).universe
            if universe is None:
                universe = epoch_order(self.spec.counts, self.spec.seed, int(first["epoch"]))
            remaining = subtract_ranges(universe, done)
            return range_size(remaining), remaining
        fp = first["fingerprint"]
        budget = int(fp["world_size"]) * int(fp["num_workers"]) * int(first.get("samples_per_worker",
                                                                                 fp["samples_per_worker"]))
        emitted = sum(int(p[1]) for st in states for p in st["positions"])
        return budget - emitted, None

    def _share(self, seen: int, skipped: dict[str, int]) -> tuple[dict[str, int], int]:
        """This rank's share of the old ranks' skip counts (their sum over ranks is kept)."""
        rank, world = self.spec.rank, self.spec.world_size

        def part(n: int) -> int:
            return n // world + (1 if rank < n % world else 0)

        return {k: part(v) for k, v in skipped.items() if part(v)}, part(seen)


DATA_KEYS = ("mode", "seed", "counts", "shuffle_buffer")  # what must match for a position to carry over


def samples_per_worker(mode: str, total: int, world_size: int, workers: int, batch_size: int,
                       samples_per_epoch: int = 0) -> int:
    """T: samples each worker emits per epoch, a multiple of the batch size, equal on every rank."""
    if mode == "exact" or not samples_per_epoch:
        return per_worker(total, world_size * workers, batch_size)
    return per_worker(samples_per_epoch, workers, batch_size)


def make_stream_spec(urls: list[str], counts: list[int], *, mode: str, rank: int, world_size: int,
                     num_workers: int, batch_size: int, shuffle_buffer: int, seed: int,
                     samples_per_epoch: int = 0, limits: Limits = DEFAULT_LIMITS) -> StreamSpec:
    if not urls:
        raise ValueError("no shards to read")
    total = sum(counts)
    if total == 0:
        raise ValueError("the shards hold no samples")
    workers = max(1, num_workers)
    if mode == "exact" and total < world_size * workers:  # else a worker's slice is empty and it fails later,
        raise ValueError(                                  # blaming unreadable shards
            f"the shards hold {total} sample{'s' if total != 1 else ''}, fewer than the {world_size * workers} "
            f"loader workers ({world_size} ranks x data.num_workers={num_workers}, at least 1) that each read a "
            "slice of them: use fewer ranks or data.num_workers, more data, or data.mode=resampled")
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
