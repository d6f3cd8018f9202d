"""The synthetic VSP generator: determinism, solvable plans, step layout, decodable images."""
from __future__ import annotations

import io
import re
from collections import Counter

import pytest
from PIL import Image

from data_pipeline.records import IMAGE_PLACEHOLDER, Record, check_image, record_to_sample, sample_to_record
from data_pipeline.sources import synthetic_vsp
from data_pipeline.vsp_world import render, simulate


def _generate(**options) -> list[Record]:
    records = list(synthetic_vsp.read(**options))
    assert all(isinstance(r, Record) for r in records)
    return records


def _fingerprint(record: Record):
    return (
        record.id,
        record.question,
        record.answer,
        record.meta,
        [img.data for img in record.images],
        [(s.kind, s.text, s.image.data if s.image else None) for s in record.steps],
    )


@pytest.fixture(scope="module")
def records() -> list[Record]:
    return _generate(num_samples=60, seed=11)


def test_same_seed_gives_identical_records(records):
    again = _generate(num_samples=60, seed=11)
    assert [_fingerprint(r) for r in again] == [_fingerprint(r) for r in records]


def test_different_seed_gives_different_records(records):
    other = _generate(num_samples=60, seed=12)
    assert [r.meta["map_desc"] for r in other] != [r.meta["map_desc"] for r in records]
    assert other[0].id == "synvsp-s12-000000"


def test_a_prefix_does_not_depend_on_num_samples(records):
    assert [_fingerprint(r) for r in _generate(num_samples=5, seed=11)] == [_fingerprint(r) for r in records[:5]]


def test_ids_task_and_level(records):
    assert [r.id for r in records[:3]] == ["synvsp-s11-000000", "synvsp-s11-000001", "synvsp-s11-000002"]
    for r in records:
        assert r.task == "vsp"
        assert r.meta["level"] == len(r.meta["map_desc"])
        assert 3 <= r.meta["level"] <= 8


def test_every_plan_succeeds_and_has_one_latent_per_move(records):
    for r in records:
        plan = r.answer.split(",")
        assert all(move in "LRUD" and len(move) == 1 for move in plan)
        assert simulate(r.meta["map_desc"], plan).success, r.id
        assert r.num_latent_segments == len(plan)


def test_step_layout(records):
    for r in records:
        kinds = [s.kind for s in r.steps]
        assert kinds == ["text", "latent"] * len(r.answer.split(",")) + ["text"]
        for move, text_step in zip(r.answer.split(","), r.steps[0::2]):
            assert re.fullmatch(rf"Move {move}: from \(\d,\d\) to \(\d,\d\), .+\.", text_step.text)
        assert r.steps[-1].text.endswith(f"\\boxed{{{r.answer}}}.")
        assert r.question.count(IMAGE_PLACEHOLDER) == 1 and "\\boxed{}" in r.question
        assert len(r.images) == 1


def test_helper_images_show_the_player_after_each_move(records):
    for r in records[:10]:
        moves = r.answer.split(",")
        path = simulate(r.meta["map_desc"], moves).path
        assert r.images[0].data == render(r.meta["map_desc"], path[0])
        # as in the benchmark's step images, the elf faces the way it just moved
        assert [img.data for img in r.helper_images] == [
            render(r.meta["map_desc"], p, facing=move) for p, move in zip(path[1:], moves)]


def test_images_decode_at_the_expected_size(records):
    for r in records:
        side = 64 * r.meta["level"]
        for ref in [*r.images, *r.helper_images]:
            assert check_image(ref.data) == "png"
            with Image.open(io.BytesIO(ref.data)) as image:
                assert image.size == (side, side)


def test_sizes_cover_the_requested_range():
    sizes = Counter(r.meta["level"] for r in _generate(num_samples=80, min_size=3, max_size=5, cell_px=16))
    assert set(sizes) == {3, 4, 5}
    assert {r.meta["level"] for r in _generate(num_samples=5, min_size=4, max_size=4, cell_px=16)} == {4}


def test_options_task_cell_px_and_ignored_inputs():
    (r,) = _generate(input_path="/nonexistent", image_root="/nowhere", task="vsp-syn", num_samples=1,
                     cell_px=24, some_unknown_option=True)
    assert r.task == "vsp-syn"
    with Image.open(io.BytesIO(r.images[0].data)) as image:
        assert image.size == (24 * r.meta["level"],) * 2


def test_records_survive_the_shard_round_trip(records):
    for index, r in enumerate(records[:5]):
        back = sample_to_record(record_to_sample(r, index))
        assert _fingerprint(back) == _fingerprint(r)


@pytest.mark.parametrize(
    "options",
    [dict(num_samples=-1), dict(min_size=5, max_size=4), dict(min_size=1), dict(hole_prob=1.0)],
)
def test_bad_arguments_raise(options):
    with pytest.raises(ValueError):
        list(synthetic_vsp.read(**options))


def test_styles_change_only_the_trace():
    """Every style is the same map and plan (same seed); only the steps, and for perceive the question, differ."""
    by_style = {st: _generate(num_samples=8, seed=5, min_size=3, max_size=5, style=st) for st in synthetic_vsp.STYLES}
    for i in range(8):
        recs = {st: by_style[st][i] for st in synthetic_vsp.STYLES}
        maps = {st: str(r.meta["map_desc"]) for st, r in recs.items()}
        assert len(set(maps.values())) == 1
        plan = recs["latent-coords"].answer.split(",")
        for st, r in recs.items():
            kinds = [s.kind for s in r.steps]
            assert r.meta["style"] == st and len(r.images) == 1
            if st in ("perceive", "locate"):
                question = synthetic_vsp.PERCEIVE_QUESTION if st == "perceive" else synthetic_vsp.LOCATE_QUESTION
                assert r.question == question and kinds == ["text"] and r.answer == r.steps[0].text
                assert r.answer.endswith(synthetic_vsp.locations(r.meta["map_desc"]))
                continue
            assert r.question == synthetic_vsp.QUESTION and r.answer == ",".join(plan)
            assert kinds.count("latent") == (len(plan) if st.startswith("latent-") else 0)
            texts = [s.text for s in r.steps if s.kind == "text"]
            assert texts[-1].endswith(f"\\boxed{{{r.answer}}}.")
            if st == "direct":
                assert len(texts) == 1
            else:
                assert [t.split(":")[0].rstrip(".") for t in texts[:-1]] == [f"Move {m}" for m in plan]
                assert all(("from (" in t) == st.endswith("-coords") for t in texts[:-1])


def test_perceive_transcript_reads_the_map():
    rec = _generate(num_samples=1, seed=2, min_size=4, max_size=4, style="perceive")[0]
    map_desc = rec.meta["map_desc"]
    rows = re.search(r"\[(.*)\]", rec.answer).group(1).split(" / ")
    symbol = {0: ".", -1: "H", 1: "P", 2: "G"}
    assert [row.split(" ") for row in rows] == [[symbol[v] for v in r] for r in map_desc]
    (pr, pc), = [(r, c) for r, row in enumerate(map_desc) for c, v in enumerate(row) if v == 1]
    assert f"The player is at ({pr},{pc})." in rec.answer


def test_unknown_style_is_refused():
    with pytest.raises(ValueError, match="style='cot': choose one of latent-coords"):
        _generate(num_samples=1, style="cot")


def test_the_short_question_changes_only_the_question():
    """question="short" asks the same maps in ~30 tokens, the map first (what the method table trains on)."""
    full = _generate(num_samples=4, seed=3, min_size=3, max_size=4, style="latent-moves")
    short = _generate(num_samples=4, seed=3, min_size=3, max_size=4, style="latent-moves", question="short")
    for a, b in zip(full, short):
        assert b.question == synthetic_vsp.SHORT_QUESTION and a.question == synthetic_vsp.QUESTION
        assert (a.steps, a.answer, a.meta, a.images) == (b.steps, b.answer, b.meta, b.images)
    for question in synthetic_vsp.QUESTIONS.values():  # the map comes first: see the comment on QUESTION
        assert question.startswith(IMAGE_PLACEHOLDER)
    with pytest.raises(ValueError, match="question='long': choose one of full, short"):
        _generate(num_samples=1, question="long")
