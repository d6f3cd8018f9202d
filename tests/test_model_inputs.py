"""Our embedding / rope / decoder path equals the stock transformers forward (tolerance: 1e-5 in fp32)."""
from __future__ import annotations

import pytest
import torch

from data_pipeline.collate import collate_packed, collate_padded, split_packed
from data_pipeline.encode import encode_record
from ilvr.model.build import TinySize, choose_attention, mrope_section
from ilvr.model.inputs import embed_tokens, rope_positions, run_decoder
from tests.factories import vsp_like_record

K = 4


@pytest.fixture
def samples(tiny):
    processor, latent_ids = tiny
    records = [vsp_like_record(n_images=n, n_latent=m, rid=f"r{n}{m}") for n, m in ((2, 3), (1, 1), (0, 2))]
    return [encode_record(r, processor, latent_ids, K, 4096) for r in records]


def test_padded_batch_matches_the_stock_forward(tiny, tiny_model_factory, samples):
    model = tiny_model_factory()
    batch = collate_padded(samples, tiny[0].tokenizer.pad_token_id)
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                    mm_token_type_ids=batch["mm_token_type_ids"]).logits
        positions, _ = rope_positions(model, batch)
        hidden, _ = run_decoder(model, embed_tokens(model, batch), positions, batch["attention_mask"])
        ours = model.lm_head(hidden)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[mask], ref[mask], atol=1e-5, rtol=1e-5)


def test_packed_batch_matches_each_sample_alone(tiny, tiny_model_factory, samples):
    model = tiny_model_factory()
    packed = collate_packed(samples, tiny[0].tokenizer.pad_token_id)
    with torch.no_grad():
        positions, _ = rope_positions(model, packed)
        hidden, _ = run_decoder(model, embed_tokens(model, packed), positions)
        bounds = packed["cu_seqlens"].tolist()
        for s, sample in enumerate(samples):
            alone = collate_padded([sample], tiny[0].tokenizer.pad_token_id)
            pos, _ = rope_positions(model, alone)
            ref, _ = run_decoder(model, embed_tokens(model, alone), pos, alone["attention_mask"])
            torch.testing.assert_close(hidden[0, bounds[s]:bounds[s + 1]], ref[0], atol=1e-5, rtol=1e-5)
    assert len(split_packed(packed)) == len(samples)


def test_batch_without_images_can_still_run_the_vision_tower(tiny, tiny_model_factory, samples):
    model = tiny_model_factory()
    batch = collate_padded([samples[2]], tiny[0].tokenizer.pad_token_id)  # no input image
    calls = []
    model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    plain = embed_tokens(model, batch)
    assert not calls
    forced = embed_tokens(model, batch, always_run_vision=True)
    assert calls and torch.equal(plain, forced)


def test_tiny_sizes_and_attention_choice():
    assert mrope_section(16) == [2, 3, 3] and mrope_section(128) == [16, 24, 24]
    with pytest.raises(ValueError):
        TinySize(hidden=60, heads=4)
    assert choose_attention("auto") == ("flash_attention_2" if torch.cuda.is_available() and _has_flash() else "sdpa")
    assert choose_attention("eager") == "eager"


def _has_flash() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def test_latent_rows_start_at_the_mean_once(tiny, tiny_model_factory):
    from ilvr.model.build import init_latent_embeddings

    processor, latent_ids = tiny
    model = tiny_model_factory()
    emb = model.get_input_embeddings().weight
    mean = emb[:latent_ids.start].mean(0)
    for i in latent_ids.as_tuple():
        torch.testing.assert_close(emb[i], mean)
    with torch.no_grad():
        emb[latent_ids.pad] += 1.0  # "trained"
    assert init_latent_embeddings(model, processor.tokenizer, latent_ids) is False
    assert not torch.allclose(emb[latent_ids.pad], mean)


def test_tiny_size_from_the_model_config():
    from ilvr.config import ModelConfig

    size = TinySize.from_config(ModelConfig(name_or_path="tiny", tiny_hidden=128, tiny_layers=3, tiny_heads=4,
                                            tiny_vision_hidden=64, tiny_vision_depth=2, tiny_rope_theta=10.0))
    assert (size.hidden, size.intermediate, size.layers, size.heads, size.kv_heads) == (128, 256, 3, 4, 2)
    assert (size.vision_hidden, size.vision_intermediate, size.vision_depth, size.rope_theta) == (64, 128, 2, 10.0)
    assert TinySize.from_config(ModelConfig(name_or_path="tiny")) == TinySize()  # the defaults are the old tiny


def test_tiny_rope_base_reaches_the_model_and_separates_columns(tiny):
    """model.tiny_rope_theta is the LM's rotary base; at the default base the columns of an image (mrope's
    last section, the lowest frequencies) turn by < 0.01 rad per column, at base 10 by > 0.1."""
    from ilvr.config import ModelConfig
    from ilvr.model.build import build_model

    processor, _ = tiny
    model = build_model(ModelConfig(name_or_path="tiny", tiny_rope_theta=10.0, attn_implementation="sdpa"),
                        processor.tokenizer, processor.image_processor)
    text = model.config.text_config
    assert text.rope_parameters["rope_theta"] == 10.0
    head_dim = text.hidden_size // text.num_attention_heads
    t, h, w = text.rope_parameters["mrope_section"]

    def slowest_column_freq(theta):
        return theta ** (-2 * (t + h + w - 1) / head_dim)

    assert slowest_column_freq(1e4) < 0.01 < 0.1 < slowest_column_freq(10.0)
