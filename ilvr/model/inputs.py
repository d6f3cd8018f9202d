"""What the stock Qwen-VL forward cannot build for ILVR, built from its public pieces.

Latent positions take vectors instead of token embeddings, so every ILVR forward
passes `inputs_embeds`. Then the stock forward no longer knows where images are nor
how to lay out multimodal rope positions; this module does both the way the stock
forward does (image features scattered over the image tokens; positions from
`get_rope_index` on the token ids) and runs the text decoder directly:

    embeds = embed_tokens(model, batch)                 # token embeddings + image features
    positions, deltas = rope_positions(model, batch)    # [3, B, T] (or [4, 1, T] packed)
    hidden, cache = run_decoder(model, embeds, positions, batch.get("attention_mask"))
    logits = model.lm_head(hidden)

`model` is the Hugging Face `Qwen2_5_VLForConditionalGeneration` / `Qwen2VLForConditionalGeneration`
(under DeepSpeed: `engine.module`).
"""
from __future__ import annotations

from typing import Any

import torch


def hidden_size(model) -> int:
    return model.config.text_config.hidden_size


def image_features(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """Vision encoder + merger: one row per merged image token, in the LLM's embedding space. [N, H]."""
    if grid_thw.numel() == 0:
        dtype = model.get_input_embeddings().weight.dtype
        return torch.zeros(0, hidden_size(model), dtype=dtype, device=pixel_values.device)
    out = model.model.get_image_features(pixel_values, grid_thw)
    return torch.cat(list(out.pooler_output), dim=0)


def dummy_image(model, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest image the vision tower accepts (one merge window, one temporal patch) as (pixels, grid)."""
    vc = model.config.vision_config
    merge = vc.spatial_merge_size
    grid = torch.tensor([[1, merge, merge]], dtype=torch.long, device=device)
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2 if hasattr(vc, "in_channels") \
        else 3 * vc.temporal_patch_size * vc.patch_size**2
    return torch.zeros(merge * merge, width, device=device), grid


def embed_tokens(model, batch: dict[str, Any], always_run_vision: bool = False) -> torch.Tensor:
    """Token embeddings with the input images' features in place of their image tokens. [B, T, H].

    With `always_run_vision`, a batch without images still runs the vision tower once on a
    dummy image (its output is added times zero): under ZeRO-3 every rank must call the
    same modules in every step, or the parameter gathers deadlock.
    """
    input_ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(input_ids)
    grid = batch.get("image_grid_thw")
    if grid is not None and grid.numel():
        feats = image_features(model, batch["pixel_values"], grid).to(embeds.dtype)
        mask = batch["mm_token_type_ids"].bool()
        if int(mask.sum()) != feats.shape[0]:
            raise ValueError(f"{int(mask.sum())} image tokens but {feats.shape[0]} image features")
        embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats)
    elif always_run_vision:
        pixels, dgrid = dummy_image(model, input_ids.device)
        embeds = embeds + 0.0 * image_features(model, pixels, dgrid).to(embeds.dtype).sum()
    return embeds


def rope_positions(model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Multimodal rope positions from the token ids, as the stock forward computes them.

    Padded batch: ([3, B, T], rope_deltas [B, 1]). Packed batch (has `cu_seqlens`): each
    sample's positions are computed alone and concatenated, with the restarting 1-D text
    positions stacked in front ([4, 1, T]): transformers reads that row to build the
    block-diagonal (per-sample) causal mask. rope_deltas is then [n_samples, 1].
    """
    ids, mm = batch["input_ids"], batch["mm_token_type_ids"]
    grid = batch.get("image_grid_thw")
    grid = grid if grid is not None and grid.numel() else None
    if "cu_seqlens" not in batch:
        return model.model.get_rope_index(ids, mm, grid, attention_mask=batch.get("attention_mask"))
    bounds = batch["cu_seqlens"].tolist()
    n_images = batch["num_images"].tolist()
    parts, deltas, first_image = [], [], 0
    for s in range(len(bounds) - 1):
        a, b = bounds[s], bounds[s + 1]
        g = grid[first_image:first_image + n_images[s]] if grid is not None and n_images[s] else None
        first_image += n_images[s]
        pos, delta = model.model.get_rope_index(ids[:, a:b], mm[:, a:b], g)
        parts.append(pos)
        deltas.append(delta)
    positions = torch.cat(parts, dim=-1)
    text = batch["position_ids"].to(positions.device).view(1, 1, -1)
    return torch.cat([text, positions], dim=0), torch.cat(deltas, dim=0)


def run_decoder(model, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: "torch.Tensor | None" = None, cache=None, use_cache: bool = False):
    """The text decoder on embeddings: (final hidden states after the last norm [B, T, H], cache)."""
    out = model.model.language_model(inputs_embeds=inputs_embeds, position_ids=position_ids,
                                     attention_mask=attention_mask, cache=cache, use_cache=use_cache)
    return out.last_hidden_state, out.cache
