"""The swap test: which text follows a segment, who swaps with whom, fed-back latents, and the CE change."""
from __future__ import annotations

import math

import pytest
import torch

from data_pipeline.collate import collate_packed, collate_padded
from data_pipeline.encode import encode_record
from ilvr.evaluation.latent_swap import (
    fed_back_latents, following_text, inputs_from_selection, segment_order, swap_partners, swap_test,
)
from ilvr.model.inputs import embed_tokens, rope_positions, run_decoder
from ilvr.model.stage1 import Injection, inject
from tests.factories import vsp_like_record

K = 3


@pytest.fixture(scope="module")
def samples(tiny):
    processor, latent_ids = tiny
    return [encode_record(vsp_like_record(n_images=1, n_latent=n, rid=f"s{i}"), processor, latent_ids, K, 4096)
            for i, n in enumerate((2, 2, 1))]


def test_following_text_runs_from_after_the_end_marker_to_before_the_next_segment(tiny, samples):
    processor, latent_ids = tiny
    batch = collate_padded(samples, processor.tokenizer.pad_token_id)
    ids, seg = batch["input_ids"], batch["latent_segments"]
    owner, ordinal, _ = segment_order(batch)
    assert owner.tolist() == [0, 0, 1, 1, 2] and ordinal.tolist() == [0, 1, 0, 1, 0]
    for s, (row, cols) in enumerate(following_text(batch)):
        assert cols.numel() > 0
        assert int(ids[row, cols[0] - 1]) == latent_ids.end  # starts right after this segment's end marker
        assert int(ids[row, int(seg[s, 1]) + K]) == latent_ids.end
        assert not torch.isin(ids[row, cols], torch.tensor(list(latent_ids.as_tuple()))).any()
        if s in (0, 2):  # text up to (not into) the next segment of the sample
            assert int(ids[row, cols[-1] + 1]) == latent_ids.start
        assert (batch["labels"][row, cols] != -100).all()


def test_partners_are_same_ordinal_segments_of_other_samples():
    owner, ordinal = torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 0, 1, 0])
    partner = swap_partners(owner, ordinal)
    assert partner.tolist() == [4, 3, 0, 1, 2]
    assert swap_partners(torch.tensor([0, 0]), torch.tensor([0, 1])).tolist() == [-1, -1]  # one sample: no swap


def test_fed_back_latents_are_the_states_before_each_pad(tiny_model_factory, tiny, samples):
    """A fixed point: with the fed-back latents injected at every pad, the final state before each pad is
    exactly the vector that pad holds (what stage 2 and inference feed back)."""
    model = tiny_model_factory().eval()
    batch = collate_padded(samples, tiny[0].tokenizer.pad_token_id)
    fed = fed_back_latents(model, batch)
    seg = batch["latent_segments"]
    which = torch.arange(seg.shape[0]).repeat_interleave(K)
    j = torch.arange(K).repeat(seg.shape[0])
    sites = Injection(seg[which, 0], seg[which, 1] + j, fed[which, j])
    with torch.no_grad():
        embeds = inject(embed_tokens(model, batch), sites, 0.0)
        hidden, _ = run_decoder(model, embeds, rope_positions(model, batch)[0], batch["attention_mask"])
    torch.testing.assert_close(hidden[sites.rows, sites.cols - 1], sites.targets, atol=1e-5, rtol=1e-5)


def test_swapping_equal_inputs_changes_nothing_and_distinct_ones_do(tiny_model_factory, tiny, samples):
    model = tiny_model_factory().eval()
    pad = tiny[0].tokenizer.pad_token_id
    batch = collate_padded(samples, pad)
    n, h = batch["latent_segments"].shape[0], model.config.text_config.hidden_size
    same = torch.randn(1, K, h).expand(n, K, h).contiguous()
    counts = torch.full((n,), K)
    result = swap_test(model, batch, same, counts)
    assert result["segments"] == 5 and result["delta"] == 0.0
    distinct = 5 * torch.randn(n, K, h, generator=torch.Generator().manual_seed(0))
    result = swap_test(model, batch, distinct, counts)
    assert result["segments"] == 5 and float((result["ce_swapped"] - result["ce"]).abs().min()) > 1e-6
    assert torch.equal(swap_test(model, batch, distinct, counts)["ce"], result["ce"])
    # a packed batch gives the same CEs (segments of one ordinal swap across packed pieces)
    packed = swap_test(model, collate_packed(samples, pad), distinct, counts)
    torch.testing.assert_close(packed["ce_swapped"], result["ce_swapped"], atol=1e-4, rtol=1e-4)


def test_own_ce_is_stage1s_ce_over_the_following_text(tiny_model_factory, tiny, samples):
    """Cross-checked through stage1_loss: with every label outside a segment's following text masked,
    stage 1's CE (eval mode: no target noise) is that segment's own CE."""
    from ilvr.config import LossConfig
    from ilvr.model.selection import select_targets
    from ilvr.model.stage1 import stage1_loss

    model = tiny_model_factory().eval()
    batch = collate_padded(samples[:1], tiny[0].tokenizer.pad_token_id)  # 2 segments, one sample
    sel = select_targets(model, batch, LossConfig(max_candidates=16), K)
    result = swap_test(model, batch, *inputs_from_selection(sel))
    assert result["segments"] == 0 and math.isnan(result["delta"])  # one sample: nobody to swap with
    for s, (row, cols) in enumerate(following_text(batch)):
        masked = dict(batch, labels=torch.full_like(batch["labels"], -100))
        masked["labels"][row, cols] = batch["labels"][row, cols]
        ce = stage1_loss(model, model, masked, LossConfig(max_candidates=16), K, selection=sel).ce.item()
        assert abs(ce - float(result["ce"][s])) < 1e-4
