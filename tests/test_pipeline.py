"""The assembled pipeline: records -> shards -> loader -> encoded batches, on the tiny processor."""
from __future__ import annotations

import os

import pytest

from data_pipeline.encode import encode_record
from data_pipeline.loader import build_loader
from data_pipeline.pipeline import build_train_loader
from data_pipeline.prepare import main as prepare_main
from data_pipeline.records import RecordError, record_to_sample
from data_pipeline.shards import ShardWriter, expand_shards, shard_sample_counts, verify_manifest
from data_pipeline.sources.synthetic_vsp import read as synthetic
from ilvr.config import DataConfig
from tests.factories import as_list

K = 4


@pytest.fixture(scope="module")
def records():
    return list(synthetic(num_samples=24, seed=3, min_size=3, max_size=6))


@pytest.fixture
def shard_dir(tmp_path, records):
    writer = ShardWriter(str(tmp_path / "shards"), prefix="train", samples_per_shard=5)
    for i, rec in enumerate(records):
        writer.write(record_to_sample(rec, i))
    writer.close()
    return str(tmp_path / "shards")


def test_round_trip_gives_back_texts_and_image_bytes(shard_dir, records):
    urls = expand_shards(shard_dir)
    assert verify_manifest(shard_dir) == []
    loader = build_loader(urls, shard_sample_counts(urls), lambda r: r, as_list, rank=0, world_size=1, batch_size=4)
    got = {r.id: r for batch in loader for r in batch}
    assert len(got) == len(records)
    for original in records:
        back = got[original.id]
        assert back.question == original.question and back.answer == original.answer
        assert back.meta == original.meta and back.task == original.task
        assert [s.kind for s in back.steps] == [s.kind for s in original.steps]
        assert [s.text for s in back.steps] == [s.text for s in original.steps]
        assert [i.load() for i in back.images] == [i.load() for i in original.images]
        assert [i.load() for i in back.helper_images] == [i.load() for i in original.helper_images]


def test_over_long_samples_are_skipped_and_counted_exactly(shard_dir, records, tiny, tiny_processor_dir):
    processor, latent_ids = tiny
    lengths = {r.id: encode_record(r, processor, latent_ids, K, 10**6).length for r in records}
    limit = sorted(lengths.values())[len(lengths) // 2]  # about half the samples are too long
    too_long = {i for i, n in lengths.items() if n > limit}
    assert 0 < len(too_long) < len(records)
    data = DataConfig(train_shards=shard_dir, processor=tiny_processor_dir, batch_size=2, num_workers=0,
                      max_length=limit, max_skip_fraction=0.9)
    loader = build_train_loader(data, K, rank=0, world_size=1, processor=processor, latent_ids=latent_ids)
    ids = [i for batch in loader for i in batch["ids"]]
    assert loader.skips.skipped == {"too_long": len(too_long)}
    assert set(ids) == set(lengths) - too_long
    assert all(lengths[i] <= limit for i in ids)


@pytest.mark.parametrize("packing", [False, True])
def test_batches_from_the_config_on_two_ranks(shard_dir, tiny, tiny_processor_dir, packing):
    processor, latent_ids = tiny
    data = DataConfig(train_shards=shard_dir, processor=tiny_processor_dir, batch_size=3, num_workers=2,
                      shuffle_buffer=4, packing=packing)
    per_rank = []
    for rank in range(2):
        loader = build_train_loader(data, K, rank, 2, processor=processor, latent_ids=latent_ids)
        batches = list(loader)
        per_rank.append(batches)
        for b in batches:
            assert len(b["ids"]) == 3
            rows = b["latent_segments"]
            for row, first_pad, k, _ in rows.tolist():
                assert (b["input_ids"][row, first_pad:first_pad + k] == latent_ids.pad).all()
                assert (b["labels"][row, first_pad:first_pad + k] == -100).all()
            if packing:
                assert b["input_ids"].shape[0] == 1 and b["cu_seqlens"].numel() == 4
            else:
                assert b["input_ids"].shape[0] == 3
    # 24 samples / (2 ranks x 2 workers) = 6 per worker = 2 batches of 3 per worker, 4 per rank
    assert len(per_rank[0]) == len(per_rank[1]) == 4


def test_prepare_cli_counts_skips_and_writes_a_manifest(tmp_path, capsys):
    src = tmp_path / "rows.jsonl"
    img = tmp_path / "map.png"
    from tests.factories import png

    img.write_bytes(png((1, 2, 3)))
    rows = [
        '{"id": "a", "text_input": "<image> go", "image_input": "map.png", '
        '"sequence_plan": [{"type": "text", "content": "x"}, {"type": "latent", "helper_image": "map.png"}]}',
        '{"id": "b", "text_input": "<image> go", "image_input": "gone.png", "sequence_plan": []}',
        'not json',
        '{"id": "c", "text_input": "<image> go", "image_input": "map.png", '
        '"sequence_plan": [{"type": "latent", "helper_image": "broken.png"}]}',
    ]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    src.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert prepare_main(["--source", "ilvr", "--input", str(src), "--image-root", str(tmp_path),
                         "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 1 samples in 1 shards" in printed
    assert "corrupt_image=1" in printed and "missing_image=1" in printed and "malformed_record=1" in printed
    manifest = (out / "manifest.json").read_text()
    assert '"samples": 1' in manifest and '"missing_image": 1' in manifest
    assert sorted(os.listdir(out)) == ["manifest.json", "train-000000.tar"]


def test_prepare_fails_cleanly_when_nothing_is_usable(tmp_path, capsys):
    src = tmp_path / "rows.jsonl"
    src.write_text("{}\n")
    assert prepare_main(["--source", "vsp", "--input", str(src), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    assert "no sample was written" in capsys.readouterr().err


def test_record_error_reasons_are_stable():
    assert RecordError("too_long", "x").reason == "too_long"
