"""The patch embedding as a matmul equals the stock Conv3d (fp32, tolerance 1e-5) and keeps the parameters."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from data_pipeline.collate import collate_padded
from data_pipeline.encode import encode_record
from ilvr.model.patch_embed import PatchLinear, use_patch_matmul
from tests.factories import vsp_like_record


def image_batch(tiny):
    processor, latent_ids = tiny
    samples = [encode_record(vsp_like_record(n_images=n, n_latent=1, rid=f"r{n}"), processor, latent_ids, 4, 4096)
               for n in (2, 1)]
    return collate_padded(samples, processor.tokenizer.pad_token_id)


def test_vision_features_and_gradients_match_the_conv(tiny, tiny_model_factory):
    batch = image_batch(tiny)
    stock, swapped = tiny_model_factory(seed=3), tiny_model_factory(seed=3)
    before = {k: v.shape for k, v in swapped.state_dict().items()}
    assert use_patch_matmul(swapped) == 1 and use_patch_matmul(swapped) == 0  # only the patch embedding
    assert isinstance(swapped.model.visual.patch_embed.proj, PatchLinear)
    assert {k: v.shape for k, v in swapped.state_dict().items()} == before  # names and shapes: same checkpoints

    feats = []
    for model in (stock, swapped):
        out = model.model.get_image_features(pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
        out = out.pooler_output if hasattr(out, "pooler_output") else out
        out = torch.cat(list(out)) if isinstance(out, (tuple, list)) else out
        out.square().sum().backward()
        feats.append((out.detach(), model.model.visual.patch_embed.proj.weight.grad.clone()))
    torch.testing.assert_close(feats[1][0], feats[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats[1][1], feats[0][1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
def test_other_input_shapes_take_the_convolution(bias):
    conv = nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 4, 4), bias=bias)
    patch = PatchLinear(conv)
    assert patch.weight is conv.weight
    one = torch.randn(5, 3, 2, 4, 4)
    many = torch.randn(2, 3, 4, 8, 12)  # several kernels per item: a real convolution
    for x in (one, many):
        torch.testing.assert_close(patch(x), conv(x), atol=1e-5, rtol=1e-5)


def test_only_patchifying_convs_are_replaced():
    model = nn.Sequential(nn.Conv3d(3, 4, kernel_size=3, stride=1, padding=1), nn.Conv3d(4, 4, kernel_size=2, stride=2))
    assert use_patch_matmul(model) == 1
    assert isinstance(model[0], nn.Conv3d) and isinstance(model[1], PatchLinear)
    with pytest.raises(ValueError, match="not a patchifying Conv3d"):
        PatchLinear(nn.Conv3d(3, 4, kernel_size=2, stride=1))
