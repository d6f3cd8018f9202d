"""Perception pre-training: one token per square, only the tower learns, seeded weights, a base the trainer loads."""
from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from data_pipeline.tiny_processor import build_tiny_processor, load_processor
from data_pipeline.vsp_squares import T_PLAYER, random_state
from ilvr.model.build import TinySize, build_tiny_model
from ilvr.model.perception import PerceptionHeads, collate_states, encode_states, train_tower, weights_sha256
from tests.factories import corpus_texts

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_perception.py"
SIZE = TinySize(hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1, vision_depth=1, vision_hidden=32,
                vision_intermediate=64, vision_heads=2)


@pytest.fixture(scope="module")
def processor32(tmp_path_factory):
    path = build_tiny_processor(str(tmp_path_factory.mktemp("p32")), corpus_texts()[:40], patch_size=32,
                                min_pixels=192 ** 2, max_pixels=512 ** 2, system_prompt="")
    return load_processor(path)[0]


def states(tag, n):
    return [random_state(random.Random(f"{tag}/{i}"), 3, 5) for i in range(n)]


def test_one_merged_token_per_square_with_its_labels(processor32):
    drawn = states("a", 6)
    encoded = encode_states(drawn, processor32.image_processor)
    for (map_desc, player, _), e in zip(drawn, encoded):
        side = len(map_desc)
        assert e.grid_thw.tolist() == [[1, 2 * side, 2 * side]]
        assert e.labels["type"].numel() == side * side
        assert int(e.labels["type"][player[0] * side + player[1]]) == T_PLAYER
    batch = collate_states(encoded)
    assert batch.labels["row"].numel() == sum(len(m) ** 2 for m, _, _ in drawn)


def test_patch_14_is_refused(tiny):
    with pytest.raises(ValueError, match="one square to one merged token"):
        encode_states(states("b", 1), tiny[0].image_processor)


def test_training_changes_the_tower_only_learns_and_is_seeded(processor32):
    tok, ip = processor32.tokenizer, processor32.image_processor
    pool = collate_states(encode_states(states("c", 8), ip))

    def run(seed):
        model = build_tiny_model(tok, ip, SIZE, seed=0)
        torch.manual_seed(seed)
        heads = PerceptionHeads(SIZE.hidden, 5)
        losses = train_tower(model, heads, lambda step: pool, steps=12, lr=3e-3)
        return model, losses

    model, losses = run(0)
    fresh = build_tiny_model(tok, ip, SIZE, seed=0)
    before, after = fresh.state_dict(), model.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.visual.") for k in changed)
    assert any("merger" in k for k in changed) and any("blocks" in k for k in changed)
    assert losses[-1] < losses[0] - 0.5  # the same batch 12 times: the heads and tower fit it
    assert weights_sha256(run(0)[0]) == weights_sha256(model)
    assert weights_sha256(run(1)[0]) != weights_sha256(model)  # other head init -> other tower
    assert weights_sha256(fresh) != weights_sha256(model)


@pytest.mark.slow
def test_the_script_writes_a_base_the_trainer_accepts_with_a_seeded_hash(tmp_path):
    from ilvr.config_checks import check_model_dir, check_processor_dir
    from ilvr.model.build import load_pretrained

    spec = importlib.util.spec_from_file_location("pretrain_perception", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--steps", "2", "--batch-size", "4", "--test-states", "8", "--tokenizer-records", "2", "--log-every", "1"]
    assert script.main(["--out", str(tmp_path / "a"), *args]) == 0
    check_model_dir(str(tmp_path / "a"))
    check_processor_dir(str(tmp_path / "a"))
    report = json.loads((tmp_path / "a" / script.REPORT).read_text())
    assert set(report["held_out"]) == {"random_tower", "pretrained_tower"}
    assert set(report["held_out"]["pretrained_tower"]["probe_accuracy"]) >= {"type", "row", "col", "nbr_up"}
    loaded = load_pretrained(str(tmp_path / "a"), torch.float32, "sdpa")
    assert weights_sha256(loaded) == report["weights_sha256"]
    processor, _ = load_processor(str(tmp_path / "a"))
    fresh = build_tiny_model(processor.tokenizer, processor.image_processor, TinySize(
        hidden=128, intermediate=256, layers=4, heads=4, kv_heads=2, vision_depth=2, vision_hidden=64,
        vision_intermediate=128, vision_heads=2, rope_theta=10.0), seed=0)
    lm = {k: v for k, v in fresh.state_dict().items() if not k.startswith("model.visual.")}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in lm.items())  # the LM: untouched random init
    assert script.main(["--out", str(tmp_path / "b"), *args, "--processor", str(tmp_path / "a")]) == 0
    again = json.loads((tmp_path / "b" / script.REPORT).read_text())["weights_sha256"]
    assert again == report["weights_sha256"]
