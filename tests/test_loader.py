"""The streaming loader: exact epochs split over ranks and workers, equal counts, resume, bad data."""
from __future__ import annotations

import collections
import json
import os
import random

import pytest

from data_pipeline.loader import build_loader
from data_pipeline.sample_plan import as_ranges, epoch_order, plan_slices, shuffled, split_ranges, subtract_ranges
from data_pipeline.records import record_to_sample
from data_pipeline.shards import ShardWriter, shard_sample_counts
from data_pipeline.skips import TooManySkips
from ilvr.training.spawn import run_on_ranks
from tests.factories import as_list, numbered_record, record_id_of, truncate_at_sample, write_shards

UNEVEN = [7, 3, 11, 1, 6]  # 28 samples in shards of very different sizes


def loader(urls, rank=0, world=1, workers=0, batch=2, **kw):
    return build_loader(urls, shard_sample_counts(urls), record_id_of, as_list, rank=rank, world_size=world,
                        batch_size=batch, num_workers=workers, **kw)


def epoch_ids(ld) -> list[list[str]]:
    return [list(b) for b in ld]


def test_plan_slices_cover_every_sample_once_in_near_equal_slices():
    counts = [5, 0, 17, 2, 9]
    for n_slices in (1, 2, 3, 4, 7, 40):
        slices = plan_slices(counts, n_slices, seed=3, epoch=1)
        seen = [(shard, i) for sl in slices for shard, a, b in sl for i in range(a, b)]
        assert sorted(seen) == [(s, i) for s, n in enumerate(counts) for i in range(n)]
        sizes = [sum(b - a for _, a, b in sl) for sl in slices]
        assert max(sizes) - min(sizes) <= 1
    assert plan_slices(counts, 4, 3, 1) == plan_slices(counts, 4, 3, 1)
    assert plan_slices(counts, 4, 3, 1) != plan_slices(counts, 4, 3, 2)


def test_shuffled_is_a_seeded_permutation():
    items = list(range(100))
    a = list(shuffled(items, 16, random.Random(1)))
    assert sorted(a) == items and a != items
    assert a == list(shuffled(items, 16, random.Random(1)))
    assert list(shuffled(items, 0, random.Random(1))) == items


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_two_workers_disjoint_equal_and_complete(tmp_path, workers):
    urls = write_shards(str(tmp_path), UNEVEN)
    world, batch, total = 2, 3, sum(UNEVEN)
    per_rank = [epoch_ids(loader(urls, rank=r, world=world, workers=workers, batch=batch, shuffle_buffer=4))
                for r in range(world)]
    counts = [len(b) for b in per_rank]
    assert counts[0] == counts[1] > 0, "every rank must yield the same number of batches"
    assert all(len(b) == batch for r in per_rank for b in r), "batches are full"
    ids = [i for r in per_rank for b in r for i in b]
    assert set(ids) == {f"rec{i:04d}" for i in range(total)}, "every sample is seen in the epoch"
    # T per worker is ceil(28 / (2 ranks * 2 logical workers)) rounded up to the batch: 9, so 36 slots
    logical = max(1, workers)
    slots = world * logical * (-(-(-(-total // (world * logical))) // batch) * batch)
    assert len(ids) == slots
    assert len(ids) - len(set(ids)) == slots - total, "only the top-up repeats samples"


def test_divisible_epoch_sees_each_sample_exactly_once(tmp_path):
    urls = write_shards(str(tmp_path), [5, 9, 2])  # 16 = 2 ranks x 2 workers x batch 4
    ids = [i for r in range(2) for b in loader(urls, rank=r, world=2, workers=2, batch=4) for i in b]
    assert sorted(ids) == [f"rec{i:04d}" for i in range(16)]


def test_epochs_differ_and_are_reproducible(tmp_path):
    urls = write_shards(str(tmp_path), UNEVEN)
    a = loader(urls, shuffle_buffer=8, seed=5)
    b = loader(urls, shuffle_buffer=8, seed=5)
    e0, e1 = epoch_ids(a), epoch_ids(a)
    assert e0 == epoch_ids(b) and e1 == epoch_ids(b)
    assert e0 != e1 and sorted(sum(e0, [])) == sorted(sum(e1, []))
    assert a.epoch == 2


@pytest.mark.parametrize("workers,stop_at", [(0, 3), (2, 5), (2, 4), (3, 13)])
def test_resume_gives_the_batches_an_uninterrupted_run_would_have_seen(tmp_path, workers, stop_at):
    urls = write_shards(str(tmp_path), UNEVEN)
    kw = dict(workers=workers, batch=2, shuffle_buffer=5, seed=11)
    full = loader(urls, **kw)
    reference = [b for _, b in zip(range(2 * len(full)), full.batches())]  # two epochs

    first = loader(urls, **kw)
    it = first.batches()
    got = [next(it) for _ in range(stop_at)]
    state = json.loads(json.dumps(first.state_dict()))  # it must survive a JSON round trip
    resumed = loader(urls, **kw)
    resumed.load_state_dict(state)
    it = resumed.batches()
    got += [next(it) for _ in range(len(reference) - stop_at)]
    assert got == reference


def test_changed_world_size_restarts_the_epoch_with_a_warning(tmp_path, caplog):
    urls = write_shards(str(tmp_path), UNEVEN)
    first = loader(urls, world=1)
    next(iter(first))
    resumed = loader(urls, rank=0, world=2)
    resumed.load_state_dict(first.state_dict())
    assert "restarting epoch 0" in caplog.text
    assert resumed.consumed == 0 and len(epoch_ids(resumed)) == len(resumed)


def test_truncated_shard_is_skipped_and_counted_exactly(tmp_path):
    urls = write_shards(str(tmp_path), [10, 10])
    truncate_at_sample(urls[0], 4)  # samples 4..9 of shard 0 are lost
    ld = loader(urls, batch=2, max_skip_fraction=0.5)
    ids = set(i for b in ld for i in b)
    assert ld.skips.skipped == {"shard_read_error": 6}
    assert ld.skips.seen == 20
    assert ids == {f"rec{i:04d}" for i in list(range(4)) + list(range(10, 20))}


def test_bad_records_are_skipped_per_reason(tmp_path):
    out = str(tmp_path / "bad")
    writer = ShardWriter(out, prefix="s", samples_per_shard=100)
    for i in range(12):
        sample = record_to_sample(numbered_record(i), i)
        if i == 2:
            sample["in0.png"] = b"\x89PNG\r\n\x1a\n garbage"  # corrupt image
        if i == 5:
            del sample["help0.png"]  # missing helper image
        if i == 7:
            sample["json"] = b"{not json"
        writer.write(sample)
    writer.close()
    urls = [os.path.join(out, "s-000000.tar")]
    from data_pipeline.records import decode_image

    def decode_all(record):  # the real encoder decodes every image; do the same here
        for ref in record.images + record.helper_images:
            decode_image(ref.load())
        return record.id

    ld = build_loader(urls, [12], decode_all, as_list, rank=0, world_size=1, batch_size=3, max_skip_fraction=0.5)
    ids = [i for b in ld for i in b]
    assert dict(ld.skips.skipped) == {"corrupt_image": 1, "missing_image": 1, "malformed_record": 1}
    assert set(ids) == {f"rec{i:04d}" for i in range(12) if i not in (2, 5, 7)}
    assert len(ids) == 12, "the epoch is topped up to its planned size"


def test_too_many_bad_samples_stop_the_run_with_a_clear_error(tmp_path):
    urls = write_shards(str(tmp_path), [30])
    truncate_at_sample(urls[0], 10)
    with pytest.raises(TooManySkips, match="data.max_skip_fraction"):
        epoch_ids(loader(urls, batch=2, max_skip_fraction=0.1))


def test_resampled_mode_is_endless_and_equal_per_rank(tmp_path):
    urls = write_shards(str(tmp_path), UNEVEN)
    lds = [loader(urls, rank=r, world=2, workers=2, batch=2, mode="resampled", samples_per_epoch=10,
                  shuffle_buffer=4) for r in range(2)]
    assert len(lds[0]) == len(lds[1]) == 6  # 10 per rank over 2 workers -> 5 -> 6 per worker in batches of 2
    for ld in lds:
        assert len(epoch_ids(ld)) == 6 and len(epoch_ids(ld)) == 6


def _epoch_on_rank(rank, world_size, urls):
    import torch.distributed as dist

    ld = loader(urls, rank=rank, world=world_size, workers=2, batch=2, shuffle_buffer=3)
    ids = [i for b in ld for i in b]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, (len(ld), ids))
    return gathered


@pytest.mark.slow
def test_on_two_gloo_ranks(tmp_path):
    urls = write_shards(str(tmp_path), UNEVEN)
    results = run_on_ranks(_epoch_on_rank, world_size=2, urls=urls)
    assert results[0] == results[1]
    (n0, ids0), (n1, ids1) = results[0]
    assert n0 == n1 and len(ids0) == len(ids1)
    assert set(ids0) | set(ids1) == {f"rec{i:04d}" for i in range(sum(UNEVEN))}
    dup = collections.Counter(ids0 + ids1)
    assert sum(c - 1 for c in dup.values()) == len(ids0) + len(ids1) - sum(UNEVEN)


# ----------------------------------------------------------------------------- another rank x worker layout
# (elastic resume: ilvr/training/elastic.py replays the old workers over the new ranks; here in one process)

def consume(lds, n: int) -> list[str]:
    """n batches from each rank's loader (in rank order); the ids they held."""
    its = [getattr(ld, "_test_it", None) or ld.batches() for ld in lds]
    for ld, it in zip(lds, its):
        ld._test_it = it
    return [i for ld in lds for _ in range(n) for i in next(ld._test_it)]


def saved(lds) -> list[dict]:
    return [json.loads(json.dumps(ld.state_dict())) for ld in lds]  # as rank<r>.json holds them


def replanned(urls, states, world: int, workers: int = 0, **kw) -> list:
    """Every new rank's loader, carried on from `states` (every old rank's state)."""
    fp = states[0]["fingerprint"]
    old = [(r, w) for r in range(fp["world_size"]) for w in range(fp["num_workers"])]
    lds = []
    for rank in range(world):
        ld = loader(urls, rank=rank, world=world, workers=workers, **kw)
        assert ld.layout_changed(states[rank % len(states)])
        done = [rg for r, w in old for rg in ld.replay_consumed(states[r], r, w)]
        ld.load_replanned(states, done)
        lds.append(ld)
    return lds


def rest_of_epoch(lds) -> list[str]:
    assert len({len(ld) - ld.consumed for ld in lds}) == 1, "every rank has the same number of batches left"
    return consume(lds, len(lds[0]) - lds[0].consumed)


def test_ranges_split_and_subtract_like_sets():
    rng = random.Random(0)
    universe = [(3, 0, 7), (0, 2, 9), (5, 0, 1), (1, 4, 20)]
    flat = [(s, i) for s, a, b in universe for i in range(a, b)]
    for n_slices in (1, 2, 5, 13, 40):
        cut = [(s, i) for sl in split_ranges(universe, n_slices) for s, a, b in sl for i in range(a, b)]
        assert cut == flat  # contiguous, in order
    for _ in range(50):
        done = rng.sample(flat, rng.randrange(len(flat)))
        left = [(s, i) for s, a, b in subtract_ranges(universe, as_ranges(done)) for i in range(a, b)]
        assert left == [x for x in flat if x not in set(done)]


def test_two_ranks_to_one_to_two_sees_every_sample_of_the_epoch_exactly_once(tmp_path):
    counts = [7, 3, 11, 1, 6, 20]  # 48 = 16 (2 ranks x 4 batches of 2) + 4 (1 rank x 2) + 28 (2 ranks x 7)
    urls = write_shards(str(tmp_path), counts)
    kw = dict(batch=2, shuffle_buffer=5, seed=3)
    a = [loader(urls, rank=r, world=2, **kw) for r in range(2)]
    ids = consume(a, 4)
    b = replanned(urls, saved(a), world=1, **kw)
    assert len(b[0]) == 16, "32 samples left, all on one rank"
    ids += consume(b, 2)
    c = replanned(urls, saved(b), world=2, **kw)
    assert len(c[0]) == 7 and len(c[1]) == 7
    ids += rest_of_epoch(c)
    assert sorted(ids) == [f"rec{i:04d}" for i in range(48)], "each sample of the epoch exactly once"
    # the next epoch is planned for the new layout, as if the run had always had it
    fresh = [loader(urls, rank=r, world=2, **kw) for r in range(2)]
    n = len(fresh[0])
    consume(fresh, n)  # its epoch 0
    assert consume(c, n) == consume(fresh, n) and c[0].epoch == fresh[0].epoch == 1


def test_uneven_layouts_repeat_only_the_top_up(tmp_path):
    urls = write_shards(str(tmp_path), UNEVEN)  # 28 samples
    a = [loader(urls, rank=r, world=2, workers=2, batch=3, shuffle_buffer=4, seed=1) for r in range(2)]
    ids = consume(a, 2)  # 12 samples, 3 from each of the 4 workers
    b = replanned(urls, saved(a), world=3, batch=2, shuffle_buffer=4, seed=1)
    assert [len(ld) for ld in b] == [3, 3, 3], "16 left over 3 ranks: 6 each (18 slots, 2 top-up repeats)"
    ids += rest_of_epoch(b)
    counts = collections.Counter(ids)
    assert set(counts) == {f"rec{i:04d}" for i in range(28)}
    assert sum(c - 1 for c in counts.values()) == 18 + 12 - 28


def test_a_remainder_smaller_than_the_workers_is_topped_up(tmp_path):
    urls = write_shards(str(tmp_path), UNEVEN)
    a = [loader(urls, batch=2, shuffle_buffer=3, seed=2)]
    ids = consume(a, 13)  # 26 of 28
    b = replanned(urls, saved(a), world=2, workers=2, batch=1, shuffle_buffer=3, seed=2)
    assert [len(ld) for ld in b] == [2, 2], "2 left over 4 workers: one each, two of them repeats"
    ids += rest_of_epoch(b)
    counts = collections.Counter(ids)
    assert set(counts) == {f"rec{i:04d}" for i in range(28)} and sum(counts.values()) == 30


def test_a_replanned_epoch_resumes_exactly_on_the_same_layout(tmp_path):
    urls = write_shards(str(tmp_path), UNEVEN)
    kw = dict(batch=2, shuffle_buffer=4, seed=5)
    a = [loader(urls, rank=r, world=2, **kw) for r in range(2)]
    consume(a, 2)
    states = saved(a)
    straight = replanned(urls, states, world=1, workers=2, **kw)
    reference = consume(straight, len(straight[0]) + 3)  # into the next epoch
    split = replanned(urls, states, world=1, workers=2, **kw)
    got = consume(split, 4)
    again = loader(urls, world=1, workers=2, **kw)
    again.load_state_dict(saved(split)[0])  # same layout: the plain, exact resume
    got += consume([again], len(reference) // 2 - 4)
    assert got == reference


def test_samples_skipped_before_the_replan_are_not_read_or_counted_again(tmp_path):
    urls = write_shards(str(tmp_path), [10, 10])
    first = epoch_order([10, 10], 4, 0)[0][0]
    truncate_at_sample(urls[first], 4)  # the epoch's first shard loses samples 4..9
    kw = dict(batch=2, seed=4, max_skip_fraction=0.5)
    a = [loader(urls, **kw)]
    ids = consume(a, 3)  # 6 samples: the read error has been met and counted
    assert a[0].skips.skipped == {"shard_read_error": 6}
    b = replanned(urls, saved(a), world=2, **kw)
    assert [len(ld) for ld in b] == [2, 2], "8 readable samples left"
    ids += rest_of_epoch(b)
    assert sorted(ids) == sorted(f"rec{i:04d}" for i in range(20) if not 10 * first + 4 <= i < 10 * first + 10)
    assert sum(ld.skips.skipped["shard_read_error"] for ld in b) == 6 and sum(ld.skips.seen for ld in b) == 20


def test_resampled_mode_carries_the_epoch_budget(tmp_path):
    urls = write_shards(str(tmp_path), UNEVEN)
    kw = dict(mode="resampled", samples_per_epoch=10, shuffle_buffer=4)
    a = [loader(urls, rank=r, world=2, workers=2, batch=2, **kw) for r in range(2)]  # 6 per worker: 24 in all
    consume(a, 2)  # 8 of them
    b = replanned(urls, saved(a), world=1, batch=2, **kw)
    assert len(b[0]) == 8, "16 samples left of the epoch's 24"
    rest_of_epoch(b)
    consume(b, 1)
    assert b[0].epoch == 1 and len(b[0]) == 5, "then epochs of samples_per_epoch on the new layout"


def test_sample_log_records_what_was_consumed(tmp_path, monkeypatch):
    urls = write_shards(str(tmp_path / "s"), [6])
    monkeypatch.setenv("ILVR_SAMPLE_LOG", str(tmp_path / "log"))
    ld = loader(urls, batch=2)
    consume([ld], 2)
    with open(tmp_path / "log.rank0.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [len(r["samples"]) for r in rows] == [2, 2] and all(r["epoch"] == 0 for r in rows)
    assert {s for r in rows for _, s in r["samples"]} <= set(range(6))
