"""Data loss is never silent: a shard set with shards missing, changed or unfinished is refused at start,
a manifest that disagrees with its shards is named as such, skips are summed over every rank, and a
prepare that fails (a full disk) leaves nothing training would take for a whole shard set.

The cases of docs/reliability.md ("Data path").
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import pytest

from data_pipeline.loader import build_loader, make_stream_spec
from data_pipeline.records import record_to_sample
from data_pipeline.shards import MANIFEST, ShardSetIncomplete, ShardWriter, expand_shards, shard_sample_counts
from data_pipeline.skips import TooManySkips
from ilvr.config import ConfigError, load_config
from ilvr.training.spawn import run_on_ranks
from tests.conftest import REPO
from tests.factories import as_list, numbered_record

TINY = str(REPO / "configs" / "tiny_cpu.yaml")


def shard_set(directory: str, shards: int = 4, per_shard: int = 6) -> list[str]:
    """`shards` shards of `per_shard` samples in one directory, with their manifest."""
    writer = ShardWriter(directory, prefix="train", samples_per_shard=per_shard)
    for i in range(shards * per_shard):
        writer.write(record_to_sample(numbered_record(i), i))
    writer.close()
    return expand_shards(directory)


def test_a_shard_listed_and_missing_stops_the_start_naming_it(tmp_path):
    urls = shard_set(str(tmp_path))
    os.remove(urls[2])
    with pytest.raises(ShardSetIncomplete, match=re.escape(f"{urls[2]} is missing")):
        expand_shards(str(tmp_path), must_exist=True)
    with pytest.raises(ConfigError, match=re.escape(f"data.train_shards: {tmp_path / MANIFEST} lists 4 shards, "
                                                    f"but {urls[2]} is missing")):
        load_config([TINY], [f"data.train_shards={tmp_path}"], check_paths=True)


def test_a_shard_of_another_size_stops_the_start_naming_it(tmp_path):
    urls = shard_set(str(tmp_path))
    size = os.path.getsize(urls[1])
    with open(urls[1], "r+b") as f:
        f.truncate(size - 1024)
    with pytest.raises(ShardSetIncomplete, match=re.escape(f"{urls[1]} is {size - 1024} bytes, the manifest lists "
                                                           f"{size}")):
        expand_shards(str(tmp_path), must_exist=True)


def test_a_directory_without_a_manifest_is_refused_but_a_glob_is_taken(tmp_path):
    urls = shard_set(str(tmp_path))
    os.remove(tmp_path / MANIFEST)
    (tmp_path / "train-000004.tar.tmp").write_bytes(b"")
    with pytest.raises(ShardSetIncomplete, match=r"holds no manifest.json \(it holds an unfinished "
                                                 r"train-000004.tar.tmp.*/\*\.tar'"):
        expand_shards(str(tmp_path))
    assert expand_shards(str(tmp_path / "*.tar"), must_exist=True) == urls  # an explicit glob stays possible


def test_a_manifest_whose_counts_disagree_with_its_shards_is_named(tmp_path):
    shard_set(str(tmp_path), shards=2, per_shard=6)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["shards"][0]["samples"] = 30  # same file, same size: only the count is wrong
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    urls = expand_shards(str(tmp_path), must_exist=True)
    loader = build_loader(urls, shard_sample_counts(urls), lambda r: r.id, as_list, rank=0, world_size=1,
                          batch_size=2, num_workers=1, max_skip_fraction=0.2)
    with pytest.raises(TooManySkips) as e:  # counts cross from the loader worker process with their example
        list(loader)
    assert re.search(r"manifest_mismatch=\d+ \(e.g. \S+train-000000.tar ends after 6 samples, but the manifest "
                     r"lists 30: manifest and shards disagree", str(e.value)), str(e.value)


def test_fewer_samples_than_loader_workers_says_so():
    with pytest.raises(ValueError, match=r"the shards hold 1 sample, fewer than the 2 loader workers \(2 ranks"):
        make_stream_spec(["a.tar"], [1], mode="exact", rank=0, world_size=2, num_workers=0, batch_size=1,
                         shuffle_buffer=0, seed=0)
    make_stream_spec(["a.tar"], [1], mode="resampled", rank=0, world_size=2, num_workers=0, batch_size=1,
                     shuffle_buffer=0, seed=0, samples_per_epoch=4)  # draws with replacement: no slices


def _step_metrics(rank: int, world_size: int) -> dict:
    """One step's metrics from the trainer's own `step_metrics`, on a stand-in trainer whose rank 1 lost data."""
    from ilvr.training.health import LossWatch
    from ilvr.training.trainer import Trainer

    skipped = Counter({"shard_read_error": 24} if rank == 1 else {"corrupt_image": 1})
    stand_in = SimpleNamespace(
        engine=SimpleNamespace(get_lr=lambda: [0.1], get_global_grad_norm=lambda: None),
        loader=SimpleNamespace(epoch=0, skips=SimpleNamespace(skipped=skipped)),
        comm=SimpleNamespace(step=lambda: {}), latents=SimpleNamespace(step_metrics=lambda parts, stage: {}),
        _part_lrs=lambda: {},
        losses=LossWatch(),
        info=SimpleNamespace(world_size=world_size, rank=rank))
    return Trainer.step_metrics(stand_in, 2, [{"loss": 1.0, "ce": 1.0}], {"tokens": 10.0, "samples": 2.0}, 1.0, 0.0, 0.0)


def test_skips_in_the_step_metrics_are_summed_over_all_ranks():
    for m in run_on_ranks(_step_metrics, world_size=2, timeout=180):
        assert m["skipped/shard_read_error"] == 24 and m["skipped/corrupt_image"] == 1 and m["skipped"] == 25


FULL_DISK = r"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from data_pipeline.prepare import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_prepare_that_runs_out_of_disk_leaves_nothing_training_takes(tmp_path):
    out = tmp_path / "shards"
    args = ["--source", "synthetic", "--num-samples", "40", "--samples-per-shard", "10", "--out", str(out),
            "--no-progress", "--min-size", "3", "--max-size", "3"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(200_000), *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=str(REPO))
    assert proc.returncode == 1, proc.stderr[-2000:]
    names = sorted(os.listdir(out))
    assert not [n for n in names if n.endswith(".tmp")], names  # the unfinished shard is gone
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["status"] == "failed" and "File too large" in manifest["error"]
    assert sorted(s["file"] for s in manifest["shards"]) == [n for n in names if n.endswith(".tar")]
    with pytest.raises(ValueError, match="is marked 'failed' by ilvr-prepare"):
        expand_shards(str(out), must_exist=True)
    assert "refused by training and evaluation" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.prepare", *args, "--overwrite"], capture_output=True,
                          text=True, timeout=300, env=env, cwd=str(REPO))  # recovery: no hand edits
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(expand_shards(str(out), must_exist=True)) == 4
