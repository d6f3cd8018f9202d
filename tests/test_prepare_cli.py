"""ilvr-prepare as a user meets it: --max-skip-fraction judged on the whole input (a failed run keeps
its shards but marks the manifest failed, which loaders refuse), and a used --out is refused or,
with --overwrite, cleared of exactly the earlier output its manifest lists."""
from __future__ import annotations

import json
import os

import pytest

from data_pipeline.prepare import main as prepare_main
from data_pipeline.shards import expand_shards
from data_pipeline.skips import SkipCounter, TooManySkips
from tests.factories import png


def write_rows(tmp_path, good: int, bad: int, bad_first: bool = True) -> str:
    """`good` usable ILVR rows and `bad` rows with a missing image (bad ones first by default)."""
    (tmp_path / "map.png").write_bytes(png((1, 2, 3)))
    plan = [{"type": "text", "content": "x"}]
    rows = [{"id": f"b{i}", "text_input": "<image> go", "image_input": "gone.png", "sequence_plan": plan}
            for i in range(bad)]
    ok = [{"id": f"g{i}", "text_input": "<image> go", "image_input": "map.png", "sequence_plan": plan}
          for i in range(good)]
    rows = rows + ok if bad_first else ok + rows
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run(tmp_path, src: str, out, *extra: str) -> int:
    return prepare_main(["--source", "ilvr", "--input", src, "--image-root", str(tmp_path), "--out", str(out),
                         "--samples-per-shard", "40", "--no-progress", *extra])


@pytest.mark.parametrize("bad_first", [True, False], ids=["bad-rows-first", "bad-rows-last"])
def test_max_skip_fraction_is_enforced_on_the_whole_input(tmp_path, capsys, bad_first):
    src = write_rows(tmp_path, good=85, bad=15, bad_first=bad_first)
    out = tmp_path / "out"
    assert run(tmp_path, src, out, "--max-skip-fraction", "0.1") == 1
    err = capsys.readouterr().err
    assert "15 of 100 rows were skipped (15.0% > --max-skip-fraction=0.1)" in err
    assert "raise --max-skip-fraction" in err and "data.max_skip_fraction" not in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "--max-skip-fraction" in manifest["error"]
    assert manifest["total_samples"] == 85 and all((out / s["file"]).is_file() for s in manifest["shards"])
    with pytest.raises(ValueError, match="marked 'failed' by ilvr-prepare"):
        expand_shards(str(out))


def test_within_the_fraction_the_run_succeeds(tmp_path):
    src = write_rows(tmp_path, good=85, bad=15)
    out = tmp_path / "out"
    assert run(tmp_path, src, out, "--max-skip-fraction", "0.2") == 0
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert len(expand_shards(str(out))) == 3


def test_final_check_ignores_min_seen_and_names_the_setting():
    skips = SkipCounter(max_fraction=0.1, what="rows", setting="--max-skip-fraction", check_each=False)
    for _ in range(3):
        skips.skip("missing_image", "x")  # no check per skip
    skips.ok(2)
    skips.check()  # 5 seen < min_seen: not judged yet
    with pytest.raises(TooManySkips, match=r"3 of 5 rows were skipped .*--max-skip-fraction=0.1"):
        skips.check(final=True)


def test_used_out_dir_is_refused_and_overwrite_leaves_no_stale_shard(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(tmp_path, write_rows(tmp_path, good=100, bad=0), out) == 0
    assert len(os.listdir(out)) == 4  # 3 shards + manifest
    small = tmp_path / "small"
    small.mkdir()
    src = write_rows(small, good=10, bad=0)
    assert run(small, src, out) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert len(os.listdir(out)) == 4  # untouched
    (out / "train-000001.tar.tmp").write_bytes(b"a crashed writer's leftover")
    assert run(small, src, out, "--overwrite") == 0
    assert sorted(os.listdir(out)) == ["manifest.json", "train-000000.tar"]  # no stale shard 1 or 2
    assert json.loads((out / "manifest.json").read_text())["total_samples"] == 10


def test_overwrite_never_removes_what_it_cannot_identify(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(tmp_path, write_rows(tmp_path, good=10, bad=0), out) == 0
    (out / "notes.txt").write_text("mine")
    (out / "other-000000.tar").write_bytes(b"not listed")  # looks like a shard, but no manifest lists it
    outside = tmp_path / "precious-000000.tar"
    outside.write_bytes(b"keep")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"].append({"file": "../precious-000000.tar", "samples": 1, "bytes": 4, "sha256": "0"})
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert run(tmp_path, write_rows(tmp_path, good=5, bad=0), out, "--overwrite") == 1
    err = capsys.readouterr().err
    assert "notes.txt" in err and "other-000000.tar" in err and "choose a new --out" in err
    assert outside.read_bytes() == b"keep" and (out / "notes.txt").is_file() and (out / "train-000000.tar").is_file()


def test_control_tokens_and_overlong_text_are_counted_at_prepare(tmp_path, capsys):
    """Training would skip both (the encoder checks the tokenizer's exact control tokens and max_length);
    prepare counts them, before any image is read, instead of shards that fail the run later."""
    (tmp_path / "map.png").write_bytes(png((1, 2, 3)))
    plan = [{"type": "text", "content": "answer <|im_end|> stays text"}]  # markers in steps are literal text
    questions = {"ok": "<image> go", "ctl": "<image> go <|im_end|><|latent_start|>", "long": "<image> " + "x" * (5 << 20)}
    rows = [{"id": k, "text_input": q, "image_input": "map.png", "sequence_plan": plan} for k, q in questions.items()]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run(tmp_path, str(src), tmp_path / "out") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["total_samples"] == 1 and manifest["skipped"] == {"control_token": 1, "too_long": 1}
    out = capsys.readouterr().out
    assert "control_token=1" in out and "question holds control tokens <|im_end|>, <|latent_start|>" in out
    assert "too_long=1" in out and "characters, more than 1048576" in out
