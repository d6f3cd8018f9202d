"""Stage-1 target selection: coverage rule, pooling, one teacher pass, batching, attention summary.

Tolerances: exact for the coverage rule and counts; 1e-6 for pooled means; 1e-5 (fp32)
where a batch is compared with its samples alone or with the stock eager attention.
"""
from __future__ import annotations

import math

import pytest
import torch

from data_pipeline.collate import collate_packed, collate_padded
from data_pipeline.encode import encode_record
from ilvr.config import LossConfig
from ilvr.model.build import build_tiny_model, init_latent_embeddings
from ilvr.model.inputs import embed_tokens, rope_positions
from ilvr.model.selection import (pool_rows, prompt_ends, prompt_image_weights, sample_spans,
                                  select_by_coverage, select_targets, teacher_states)
from tests.factories import vsp_like_record

K = 4


def encode(tiny, n_images: int, n_latent: int, rid: str = "r"):
    processor, latent_ids = tiny
    return encode_record(vsp_like_record(n_images=n_images, n_latent=n_latent, rid=rid), processor, latent_ids, K, 4096)


@pytest.fixture(scope="module")
def samples(tiny):
    return [encode(tiny, n, m, f"r{n}{m}") for n, m in ((2, 3), (1, 1), (0, 2))]


def expected_count(cos: list[float], temperature: float, coverage: float, cap: int) -> int:
    """The coverage rule written out by hand."""
    exps = [math.exp(c / temperature) for c in cos]
    probs = sorted((e / sum(exps) for e in exps), reverse=True)
    total = 0.0
    for k, p in enumerate(probs, 1):
        total += p
        if total >= coverage:
            return min(k, cap)
    return min(len(probs), cap)


def hand_made(cos: list[float]):
    """Unit candidates with the given cosines to the query (1, 0), plus one masked-out copy of the query."""
    angles = torch.tensor(cos, dtype=torch.float64).acos()
    cands = torch.stack([angles.cos(), angles.sin()], -1).float()
    cands = torch.cat([cands, torch.tensor([[1.0, 0.0]])])  # padding: would win if it were not masked
    mask = torch.tensor([True] * len(cos) + [False])
    return cands[None], mask[None], torch.tensor([[1.0, 0.0]])


@pytest.mark.parametrize("temperature, coverage", [(0.01, 0.9), (100.0, 0.9), (0.2, 0.9), (0.2, 0.5), (1.0, 1.0)])
def test_coverage_rule_on_hand_made_scores(temperature, coverage):
    cos = [0.0, 0.9, -0.5, 1.0, 0.5, 0.2, 0.8, -1.0]  # best candidates are not first in raster order
    cands, mask, query = hand_made(cos)
    cap = 3
    targets, counts, max_prob = select_by_coverage(cands, mask, query, torch.tensor([cap]), temperature, coverage, K)
    want = expected_count(cos, temperature, coverage, cap)
    assert int(counts[0]) == want
    if temperature == 0.01:
        assert want == 1  # a sharp softmax: one pick
    if temperature == 100.0:
        assert want == cap  # a flat softmax: always the cap
    ranked = sorted(range(len(cos)), key=lambda i: -cos[i])[:want]
    torch.testing.assert_close(targets[0, :want], cands[0, sorted(ranked)])  # picks, back in raster order
    assert torch.equal(targets[0, want:], torch.zeros(K - want, 2))
    probs = torch.softmax(torch.tensor(cos) / temperature, 0)
    torch.testing.assert_close(max_prob[0], probs.max())


def test_flat_scores_of_many_candidates_always_pick_the_cap():
    """Temperature 1 over 256 cosine scores is nearly uniform: K* = K for every query (the
    reference's "adaptive" selection is not); a low temperature makes the counts vary."""
    gen = torch.Generator().manual_seed(0)
    cands = torch.randn(32, 256, 64, generator=gen)
    query = torch.randn(32, 64, generator=gen)
    mask = torch.ones(32, 256, dtype=torch.bool)
    cap = torch.full((32,), 8)
    _, counts, max_prob = select_by_coverage(cands, mask, query, cap, 1.0, 0.9, 8)
    assert counts.tolist() == [8] * 32 and float(max_prob.max()) < 0.01
    _, sharp, _ = select_by_coverage(cands, mask, query, cap, 0.01, 0.9, 8)
    assert int(sharp.min()) >= 1 and int(sharp.max()) <= 8 and int(sharp.min()) < 8


def test_pooling_keeps_means_of_contiguous_raster_chunks():
    feats = torch.arange(13 * 2, dtype=torch.float32).view(13, 2)
    pooled, mask = pool_rows(feats, torch.tensor([10, 3]), 4)
    assert pooled.shape == (2, 4, 2)
    first = feats[:10]
    for row, (a, b) in enumerate([(0, 3), (3, 5), (5, 8), (8, 10)]):  # chunk c = rows floor(c*10/4)..
        torch.testing.assert_close(pooled[0, row], first[a:b].mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled[1, :3], feats[10:], atol=1e-6, rtol=0)  # fewer than L: kept as is
    assert mask.tolist() == [[True] * 4, [True, True, True, False]]


@pytest.mark.parametrize("n_latent", [1, 3, 6])
def test_teacher_runs_one_decoder_forward_per_batch(tiny, tiny_model_factory, n_latent):
    teacher = tiny_model_factory()
    calls = []
    teacher.model.language_model.register_forward_hook(lambda *a: calls.append(1))
    batch = collate_padded([encode(tiny, 1, n_latent)], tiny[0].tokenizer.pad_token_id)
    sel = select_targets(teacher, batch, LossConfig(max_candidates=16), K)
    assert len(calls) == 1
    assert sel.targets.shape == (n_latent, K, teacher.config.text_config.hidden_size)
    assert int(sel.counts.min()) >= 1 and int(sel.counts.max()) <= K
    assert sel.num_candidates.tolist() == [16] * n_latent  # 64 helper features pooled to L = 16
    assert not sel.targets.requires_grad


@pytest.mark.parametrize("temperature", [1.0, 0.002])
def test_batched_selection_equals_each_sample_alone(tiny, tiny_model_factory, samples, temperature):
    teacher = tiny_model_factory()
    cfg = LossConfig(temperature=temperature)
    pad = tiny[0].tokenizer.pad_token_id
    padded = select_targets(teacher, collate_padded(samples, pad), cfg, K)
    packed = select_targets(teacher, collate_packed(samples, pad), cfg, K)
    alone = [select_targets(teacher, collate_padded([s], pad), cfg, K) for s in samples]
    targets = torch.cat([a.targets for a in alone])
    counts = torch.cat([a.counts for a in alone])
    for sel in (padded, packed):
        assert torch.equal(sel.counts, counts)
        torch.testing.assert_close(sel.targets, targets, atol=1e-5, rtol=1e-5)


def test_prompt_attention_equals_the_stock_eager_weights(tiny, samples):
    """Our recomputed last-layer prompt->image attention equals transformers' own (eager) weights."""
    processor, latent_ids = tiny
    models = []
    for attn in ("sdpa", "eager"):
        model = build_tiny_model(processor.tokenizer, processor.image_processor, attn_implementation=attn)
        init_latent_embeddings(model, processor.tokenizer, latent_ids)
        models.append(model.eval())
    batch = collate_padded(samples, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        _, layer_input, positions = teacher_states(models[0], batch)
        rows, starts, ends = sample_spans(batch)
        prompt_end = prompt_ends(batch["labels"], rows, starts, ends)
        is_image = batch["mm_token_type_ids"].bool()
        ours, _ = prompt_image_weights(models[0], layer_input, positions, rows, starts, prompt_end, is_image)
        pos, _ = rope_positions(models[1], batch)
        out = models[1].model.language_model(inputs_embeds=embed_tokens(models[1], batch), position_ids=pos,
                                             attention_mask=batch["attention_mask"], use_cache=False,
                                             output_attentions=True)
    stock = out.attentions[-1].mean(1)  # [B, T, T]
    for b in range(len(samples)):
        p = int(prompt_end[b])
        image = is_image[b, :p]
        if not image.any():
            assert torch.allclose(ours[b], torch.zeros_like(ours[b]))
            continue
        w = stock[b, :p, :p][~image].mean(0)[image]
        torch.testing.assert_close(ours[b, :p][image], w / w.sum(), atol=1e-5, rtol=1e-5)
