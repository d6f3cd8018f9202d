"""The changed-square share of stage-1 selections: which merged tokens changed, and whether the picks include one."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from data_pipeline.collate import collate_padded
from data_pipeline.encode import encode_record
from data_pipeline.records import ImageRef, Record, Step
from data_pipeline.tiny_processor import build_tiny_processor, load_processor
from data_pipeline.vsp_world import render_states
from ilvr.model.changed_squares import chance_of_a_hit, changed_candidates, changed_stats, previous_images
from ilvr.model.selection import Selection
from tests.factories import corpus_texts

MAP = [[1, 0, -1],
       [0, -1, 0],
       [0, 0, 2]]
PATH = [(0, 0), (0, 1), (0, 1), (1, 1)]  # R, then U off the edge (only the facing changes), then D into the hole
MOVES = ["R", "U", "D"]
K = 4


@pytest.fixture(scope="module")
def processor32(tmp_path_factory):
    """The method table's image settings: patch 32, so one merged token is one 64 px square."""
    path = build_tiny_processor(str(tmp_path_factory.mktemp("p32")), corpus_texts()[:40], patch_size=32,
                                min_pixels=192 ** 2, max_pixels=512 ** 2, system_prompt="")
    return load_processor(path)


def vsp_batch(processor32, paths, moves):
    processor, latent_ids = processor32
    samples = []
    for i, (path, sample_moves) in enumerate(zip(paths, moves)):
        images = render_states(MAP, path, moves=sample_moves)
        steps = []
        for image in images[1:]:
            steps += [Step.of_text("Move."), Step.of_latent(ImageRef(data=image))]
        record = Record(id=f"m{i}", task="vsp", question="<image>\nPlan.", images=[ImageRef(data=images[0])],
                        steps=steps + [Step.of_text("done")], answer="", meta={"map_desc": MAP})
        samples.append(encode_record(record, processor, latent_ids, K, 4096))
    return collate_padded(samples, processor.tokenizer.pad_token_id)


def test_changed_tokens_are_the_squares_the_elf_left_and_reached(processor32):
    batch = vsp_batch(processor32, [PATH], [MOVES])
    assert previous_images(batch) == [("image", 0), ("helper", 0), ("helper", 1)]
    changed, comparable = changed_candidates(batch, merge=2, max_rows=64)
    assert comparable.tolist() == [True] * 3
    squares = [set(changed[g].nonzero().squeeze(1).tolist()) for g in range(3)]
    assert squares == [{0, 1}, {1}, {1, 4}]  # raster index r*3+c: (0,0)+(0,1); the elf turns; (0,1)+(1,1)


def test_pooled_candidates_changed_when_their_chunk_holds_a_changed_token(processor32):
    batch = vsp_batch(processor32, [PATH], [MOVES])
    changed, _ = changed_candidates(batch, merge=2, max_rows=3)  # 9 tokens -> chunks {0,1,2} {3,4,5} {6,7,8}
    assert changed.tolist() == [[True, False, False], [True, False, False], [True, True, False]]


def selection_with(picks, counts, n_candidates=9):
    s = len(picks)
    return Selection(torch.zeros(s, K, 8), torch.tensor(counts), torch.ones(s), torch.full((s,), n_candidates),
                     picks=torch.tensor(picks), candidate_rows=64)


def test_share_counts_segments_whose_picks_include_a_changed_square(processor32):
    batch = vsp_batch(processor32, [PATH], [MOVES])
    hit_all = selection_with([[1, 5, -1, -1], [1, -1, -1, -1], [4, 0, -1, -1]], [2, 1, 2])
    miss_all = selection_with([[2, 3, -1, -1], [0, 8, 7, -1], [0, 2, 3, 5]], [2, 3, 4])
    one_of_three = selection_with([[8, 1, -1, -1], [0, -1, -1, -1], [7, -1, -1, -1]], [2, 1, 1])
    assert changed_stats(batch, hit_all, 2)["changed_share"] == 1.0
    assert changed_stats(batch, miss_all, 2)["changed_share"] == 0.0
    stats = changed_stats(batch, one_of_three, 2)
    assert stats["changed_share"] == pytest.approx(1 / 3) and stats["changed_segments"] == 3
    # a changed index past counts (-1 there) is not a pick
    assert changed_stats(batch, selection_with([[2, -1, -1, -1]] * 3, [1, 1, 1]), 2)["changed_share"] == 0.0


def test_chance_matches_counting_every_draw():
    for n, c, k in ((9, 2, 1), (9, 2, 4), (9, 1, 3), (16, 3, 4), (5, 0, 2), (4, 4, 1)):
        hits = sum(any(i < c for i in draw) for draw in itertools.combinations(range(n), k))
        want = hits / math.comb(n, k)
        got = chance_of_a_hit(torch.tensor([float(n)]), torch.tensor([float(c)]), torch.tensor([k]))
        assert float(got) == pytest.approx(want), (n, c, k)


def test_stage1_reports_the_share_as_a_latent_metric(processor32):
    from ilvr.config import LossConfig
    from ilvr.model.build import TinySize, build_tiny_model
    from ilvr.model.stage1 import stage1_loss

    processor, _ = processor32
    model = build_tiny_model(processor.tokenizer, processor.image_processor, TinySize())
    batch = vsp_batch(processor32, [PATH, [(0, 0), (1, 0)]], [MOVES, ["D"]])
    out = stage1_loss(model, model, batch, LossConfig(max_candidates=64), K)
    assert out.stats["changed_segments"] == 4
    assert 0.0 <= out.stats["changed_share"] <= 1.0 and 0.0 < out.stats["changed_chance"] < 1.0


def test_recorded_picks_are_the_candidates_the_targets_came_from(processor32):
    from ilvr.config import LossConfig
    from ilvr.model.build import TinySize, build_tiny_model
    from ilvr.model.selection import gather_picks, helper_candidates, pooled_targets, select_targets

    processor, _ = processor32
    model = build_tiny_model(processor.tokenizer, processor.image_processor, TinySize())
    batch = vsp_batch(processor32, [PATH, [(0, 0), (1, 0)]], [MOVES, ["D"]])
    for order in ("probability", "raster"):
        sel = select_targets(model, batch, LossConfig(max_candidates=64, target_order=order), K)
        cands, _ = helper_candidates(model, batch, sel.candidate_rows)
        assert torch.equal(gather_picks(cands[batch["latent_segments"][:, 3]], sel.picks).float(), sel.targets.float())
        assert torch.equal((sel.picks >= 0).sum(1), sel.counts)
    pooled = pooled_targets(model, batch, K)
    cands, _ = helper_candidates(model, batch, K)
    assert torch.equal(gather_picks(cands[batch["latent_segments"][:, 3]], pooled.picks), pooled.targets)


def test_change_weight_makes_the_picks_include_what_changed(processor32):
    """`loss.change_weight` (not the method, off by default): with a strong change term every comparable
    segment's picks include a changed square, also on the random tower that the faithful query passes over
    (its share stays below 1 here); each segment's FIRST pick is a changed candidate."""
    from ilvr.config import LossConfig
    from ilvr.model.build import TinySize, build_tiny_model
    from ilvr.model.selection import select_targets

    processor, _ = processor32
    model = build_tiny_model(processor.tokenizer, processor.image_processor, TinySize())
    paths = [PATH, [(0, 0), (1, 0)], [(0, 0), (1, 0), (2, 0), (2, 1)]]
    batch = vsp_batch(processor32, paths, [MOVES, ["D"], ["D", "D", "R"]])
    merge = model.config.vision_config.spatial_merge_size
    faithful = select_targets(model, batch, LossConfig(max_candidates=64), K)
    changed_first = select_targets(model, batch, LossConfig(max_candidates=64, change_weight=10.0), K)
    base, boosted = changed_stats(batch, faithful, merge), changed_stats(batch, changed_first, merge)
    assert boosted["changed_segments"] == 7
    assert boosted["changed_share"] == 1.0 and base["changed_share"] < 1.0, (base, boosted)
    changed, _ = changed_candidates(batch, merge, changed_first.candidate_rows)
    first = changed_first.picks[:, 0]
    assert changed[batch["latent_segments"][:, 3], first].all()
