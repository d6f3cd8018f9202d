"""FlashAttention-2 vs SDPA: the fast path and the fallback give the same outputs (needs CUDA + flash-attn).

Tolerance: bf16 attention kernels differ in accumulation order; hidden states agree to
about 2e-2 absolute after two layers at this size.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from data_pipeline.collate import collate_packed, collate_padded
from data_pipeline.encode import encode_record
from ilvr.model.inputs import embed_tokens, rope_positions, run_decoder
from tests.factories import vsp_like_record

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None,
                                                  reason="flash-attn is not installed")]


def _to(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _hidden(model, batch):
    positions, _ = rope_positions(model, batch)
    hidden, _ = run_decoder(model, embed_tokens(model, batch), positions, batch.get("attention_mask"))
    return hidden


@pytest.mark.parametrize("packed", [False, True])
def test_flash_matches_sdpa(tiny, tiny_model_factory, packed):
    processor, latent_ids = tiny
    samples = [encode_record(vsp_like_record(n_images=n, n_latent=m, rid=str(n)), processor, latent_ids, 4, 4096)
               for n, m in ((2, 3), (1, 1), (0, 2))]
    pad = processor.tokenizer.pad_token_id
    batch = _to(collate_packed(samples, pad) if packed else collate_padded(samples, pad), "cuda")
    outs = {}
    for impl in ("sdpa", "flash_attention_2"):
        model = tiny_model_factory(hidden=128, heads=4, layers=2).to("cuda", torch.bfloat16)
        model.set_attn_implementation(impl)
        with torch.no_grad():
            outs[impl] = _hidden(model, batch).float()
    mask = torch.ones_like(batch["input_ids"], dtype=torch.bool) if packed else batch["attention_mask"].bool()
    torch.testing.assert_close(outs["flash_attention_2"][mask], outs["sdpa"][mask], atol=2e-2, rtol=2e-2)
