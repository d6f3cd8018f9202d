"""The streaming loader: exact epochs split over ranks and workers, equal counts, resume, bad data."""
from __future__ import annotations

import collections
import json
import os
import random

import pytest

from data_pipeline.loader import build_loader, plan_slices, shuffled
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
