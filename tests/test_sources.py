"""Source converters: real VSP and Mirage files, hand-written ILVR and Zebra-CoT rows."""
from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from data_pipeline.records import Record, RecordError, record_to_sample, sample_to_record
from data_pipeline.sources import ilvr_jsonl, mirage_jsonl, vsp, zebra_cot

CONVERTERS = [ilvr_jsonl.read, mirage_jsonl.read, vsp.read, zebra_cot.read]


def split(results) -> tuple[list[Record], list[RecordError]]:
    results = list(results)
    assert all(isinstance(r, (Record, RecordError)) for r in results)
    return [r for r in results if isinstance(r, Record)], [r for r in results if isinstance(r, RecordError)]


def write_jsonl(path: Path, rows: list) -> str:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def png_bytes(color: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def make_images(root: Path, *names: str) -> None:
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(png_bytes(["red", "green", "blue", "white", "black"][i % 5]))


# ----------------------------------------------------------------------------- VSP


def test_vsp_real_test_file(shared_data):
    records, errors = split(vsp.read(str(shared_data / "vsp_test/test_direct.jsonl"), str(shared_data / "vsp_test")))
    assert errors == [] and len(records) == 400
    assert len({r.id for r in records}) == 400
    for rec in records:
        assert rec.task == "vsp" and rec.steps == [] and rec.answer == ""
        assert rec.question.count("<image>") == len(rec.images) == 1
        assert os.path.isfile(rec.images[0].path), rec.images[0].path
        assert rec.meta["level"] == len(rec.meta["map_desc"]) and rec.id == f"level{rec.meta['level']}-{rec.meta['map_id']}"
    assert {r.meta["level"] for r in records} == {3, 4, 5, 6}
    json.dumps([r.meta for r in records])


def test_vsp_rejects_bad_maps_and_repeated_ids(tmp_path):
    good = {"text_input": "Map: <image>", "image_input": "a.png", "map_id": "7", "map_desc": [[2, 0], [-1, 1]]}
    bad_maps = [[[2, 0], [1]], [[2, 0], [3, 1]], [[2, 2], [0, 1]], [[2, 0], [0, 0]], [], [[2, True], [0, 1]]]
    rows = [good] + [dict(good, map_desc=m) for m in bad_maps] + [good]
    records, errors = split(vsp.read(write_jsonl(tmp_path / "t.jsonl", rows), str(tmp_path)))
    assert [r.id for r in records] == ["level2-7"]
    assert [e.reason for e in errors] == ["malformed_record"] * len(bad_maps) + ["duplicate_id"]
    assert "t.jsonl:2:" in str(errors[0]) and "t.jsonl:8:" in str(errors[-1])


# ----------------------------------------------------------------------------- Mirage


def test_mirage_real_examples(shared_data):
    root = shared_data / "mirage_examples"
    records, errors = split(mirage_jsonl.read(str(root / "sample.jsonl"), str(root)))
    # 10 rows; `wc -l` says 9 because the last line has no newline.
    assert errors == [] and len(records) == 10
    for rec in records:
        assert rec.num_latent_segments == 1 and os.path.isfile(rec.helper_images[0].path)
        assert os.path.isfile(rec.images[0].path) and rec.question.count("<image>") == 1
        assert rec.answer in {"A", "B", "C"} and rec.task == "generic"
        assert "<output_image>" not in "".join(s.text for s in rec.steps)
        assert rec.steps[0].kind == "text" and rec.steps[-1].text.endswith(f"\\boxed{{{rec.answer}}}.")


def test_mirage_record_round_trips_through_a_shard_sample(shared_data):
    root = shared_data / "mirage_examples"
    record = next(r for r in mirage_jsonl.read(str(root / "sample.jsonl"), str(root)) if isinstance(r, Record))
    back = sample_to_record(record_to_sample(record, 0))
    assert (back.id, back.task, back.question, back.answer, back.meta) == (
        record.id, record.task, record.question, record.answer, record.meta,
    )
    assert [(s.kind, s.text) for s in back.steps] == [(s.kind, s.text) for s in record.steps]
    assert back.images[0].data == record.images[0].load()
    assert back.helper_images[0].data == record.helper_images[0].load()


def test_mirage_markers_must_match_helpers(tmp_path):
    base = {"text_input": "Q", "image_input": "in.png"}
    rows = [
        dict(base, image_output=["h1.png", "h2.png"], text_output="a<output_image>b<output_image>\\boxed{B}"),
        dict(base, image_output="h1.png", text_output="no marker \\boxed{C}"),
        dict(base, image_output="h1.png", text_output="a<output_image>b<output_image>c"),
        dict(base, image_output=["h1.png", "h2.png"], text_output="only text"),
    ]
    records, errors = split(mirage_jsonl.read(write_jsonl(tmp_path / "m.jsonl", rows), str(tmp_path)))
    assert [[s.kind for s in r.steps] for r in records] == [["text", "latent", "text", "latent", "text"], ["latent", "text"]]
    assert [r.answer for r in records] == ["B", "C"] and records[0].question == "<image>Q"
    assert [e.reason for e in errors] == ["malformed_record", "malformed_record"]


# ----------------------------------------------------------------------------- ILVR JSONL


def test_ilvr_jsonl_rows(tmp_path):
    rows = [
        {
            "text_input": "Compare <image> and <image>.",
            "image_input": ["imgs/a.png", "imgs/b.png"],
            "sequence_plan": [
                {"type": "text", "content": "First look."},
                {"type": "latent", "helper_image": "imgs/h1.png"},
                {"type": "text", "content": "Then again."},
                {"type": "latent", "helper_image": "imgs/h2.png"},
                {"type": "text", "content": "So \\boxed{\\frac{1}{2}}."},
            ],
            "category": "selection",
            "choices": ["A", "B"],
        },
        {"text_input": "Q", "image_input": "imgs/a.png", "sequence_plan": [{"type": "latent"}]},
        {"text_input": "Map", "image_input": "imgs/a.png", "original_final_answer": "RRD", "map_desc": [[2, 1]],
         "sequence_plan": [{"type": "text", "content": "\\boxed{L}"}]},
        {"id": "row-4", "text_input": "Q", "image_input": 5, "sequence_plan": []},
    ]
    make_images(tmp_path / "imgs", "a.png", "b.png", "h1.png", "h2.png")
    records, errors = split(ilvr_jsonl.read(write_jsonl(tmp_path / "train.jsonl", rows), str(tmp_path)))
    first, vsp_row = records
    assert [s.kind for s in first.steps] == ["text", "latent", "text", "latent", "text"]
    assert first.question == "Compare <image> and <image>." and len(first.images) == 2
    assert all(os.path.isfile(ref.path) for ref in first.images + first.helper_images)
    assert first.answer == "\\frac{1}{2}" and first.task == "generic" and first.id == "train-1"
    assert first.meta == {"category": "selection", "choices": ["A", "B"]}
    assert vsp_row.task == "vsp" and vsp_row.answer == "RRD" and vsp_row.meta["level"] == 1 and vsp_row.id == "train-3"
    assert [e.reason for e in errors] == ["malformed_record"] * 2
    assert "train.jsonl:2:" in str(errors[0]) and "train.jsonl:4:" in str(errors[1])
    assert next(iter(ilvr_jsonl.read(str(tmp_path / "train.jsonl"), str(tmp_path), task="comt"))).task == "comt"


# ----------------------------------------------------------------------------- Zebra-CoT


def zebra_rows(root: Path) -> list[dict]:
    make_images(root, "p1.png", "p2.png", "r1.png", "r2.png")
    embedded = {"bytes": base64.b64encode(png_bytes("white")).decode(), "path": "x.png"}
    return [
        {
            "Question": "Which piece fits? <image_start>[problem_image_1]<image_end> and <image_start>[problem_image_2]<image_end>",
            "Text Reasoning Trace": "THOUGHT 0: Look at <image_start>[problem_image_2]<image_end>.\n"
            "<image_start>[reasoning_image_1]<image_end>\nTHOUGHT 1: Now try the other.\n"
            "<image_start>[reasoning_image_2]<image_end>\nTHOUGHT 2: Piece B fits.",
            "Final Answer": "B",
            "problem_image_1": "p1.png", "problem_image_2": "p2.png",
            "reasoning_image_1": "r1.png", "reasoning_image_2": {"bytes": None, "path": "r2.png"},
            "reasoning_image_3": None,
        },
        {
            "Question": "Count the cubes.", "category": "3D Visual Reasoning",
            "Text Reasoning Trace": "<image_start>[reasoning_image_1]<image_end> THOUGHT 0: There are 4, \\boxed{4}",
            "Final Answer": 4, "problem_image_1": embedded, "reasoning_image_1": embedded,
        },
        {"Question": "Q", "Text Reasoning Trace": "<image_start>[reasoning_image_1]<image_end>", "Final Answer": "x"},
        {"Question": "Q", "Text Reasoning Trace": "T", "Final Answer": "x", "problem_image_1": {"bytes": "@@notb64"}},
        {"Question": "Q", "Text Reasoning Trace": "T"},
    ]


def test_zebra_cot_rows(tmp_path):
    path = write_jsonl(tmp_path / "zebra.jsonl", zebra_rows(tmp_path))
    records, errors = split(zebra_cot.read(path, str(tmp_path), category="2D Visual Reasoning"))
    jigsaw, cubes = records
    assert jigsaw.question == "Which piece fits? <image> and <image>" and jigsaw.task == "zebra"
    assert [os.path.basename(i.path) for i in jigsaw.images] == ["p1.png", "p2.png"]
    assert [s.kind for s in jigsaw.steps] == ["text", "latent", "text", "latent", "text", "text"]
    assert jigsaw.steps[0].text == "THOUGHT 0: Look at [problem_image_2]."
    assert [os.path.basename(i.path) for i in jigsaw.helper_images] == ["r1.png", "r2.png"]
    assert jigsaw.steps[-1].text == "Final Answer: \\boxed{B}" and jigsaw.answer == "B"
    assert jigsaw.meta == {"category": "2D Visual Reasoning"}
    assert cubes.question == "<image>Count the cubes." and cubes.answer == "4"
    assert cubes.images[0].data == png_bytes("white") and cubes.helper_images[0].data == png_bytes("white")
    assert [s.kind for s in cubes.steps] == ["latent", "text"] and cubes.meta == {"category": "3D Visual Reasoning"}
    assert [e.reason for e in errors] == ["missing_image", "malformed_record", "malformed_record"]
    assert "zebra.jsonl:3:" in str(errors[0]) and "reasoning_image_1" in str(errors[0])
    for rec in records:
        record_to_sample(rec, 0)  # every referenced image decodes


# ----------------------------------------------------------------------------- all converters


def test_ids_are_stable_across_reads(tmp_path, shared_data):
    zebra_path = write_jsonl(tmp_path / "zebra.jsonl", zebra_rows(tmp_path))
    runs = [
        (vsp.read, str(shared_data / "vsp_test/test_direct.jsonl")),
        (mirage_jsonl.read, str(shared_data / "mirage_examples/sample.jsonl")),
        (zebra_cot.read, zebra_path),
    ]
    for read, path in runs:
        first = [r.id for r in read(path) if isinstance(r, Record)]
        second = [r.id for r in read(path) if isinstance(r, Record)]
        assert first and first == second and len(set(first)) == len(first)


@pytest.mark.parametrize("read", CONVERTERS, ids=lambda f: f.__module__.rsplit(".", 1)[-1])
def test_bad_json_line_is_yielded_as_error(tmp_path, read):
    path = write_jsonl(tmp_path / "broken.jsonl", ['{"text_input": "unterminated', "[1, 2]", "", "{}"])
    results = list(read(path, str(tmp_path)))
    assert len(results) == 3 and all(isinstance(r, RecordError) for r in results)
    assert all(r.reason == "malformed_record" for r in results)
    assert "broken.jsonl:1:" in str(results[0]) and "broken.jsonl:4:" in str(results[2])


def test_vsp_real_maps_in_the_synthetic_wording(shared_data):
    from data_pipeline.sources import synthetic_vsp

    path = str(shared_data / "vsp_test/test_direct.jsonl")
    records, errors = split(vsp.read(path, str(shared_data / "vsp_test"), prompt="synthetic"))
    rows, _ = split(vsp.read(path, str(shared_data / "vsp_test")))
    assert errors == [] and len(records) == 400
    assert all(r.question == synthetic_vsp.QUESTION for r in records)
    assert [(r.id, r.images[0].path, r.meta) for r in records] == [(r.id, r.images[0].path, r.meta) for r in rows]
    short, _ = split(vsp.read(path, str(shared_data / "vsp_test"), prompt="synthetic-short"))
    assert all(r.question == synthetic_vsp.SHORT_QUESTION for r in short) and len(short) == 400
    with pytest.raises(ValueError, match="prompt='mine'"):
        list(vsp.read(path, None, prompt="mine"))
