"""The vision tower's patch embedding as one matrix multiply: same parameters, same result, faster.

Qwen2-VL and Qwen2.5-VL embed each patch (C x T x P x P pixels) with a Conv3d whose kernel equals
its stride and its input: a linear map of the flattened patch. PyTorch runs that Conv3d about 5x
slower than the equivalent matmul on CPU (288 patches of 3x2x32x32 -> 64: 8.4 ms vs 1.6 ms, one
thread), and some cuDNN versions are far slower still. `PatchLinear` holds the Conv3d's own `weight`
(and `bias`) Parameter objects, with their shapes and names, so state dicts, checkpoints, exports,
the teacher's EMA pairing and ZeRO-3 partitioning are all unchanged. transformers' own fusion
(`fusion_config={"patch_embeddings": True}`, transformers/fusion_mapping.py) does the same math but
renames the weight to a 2-D `patch_embed.linear_proj.weight`, which would change the names in
DeepSpeed checkpoints and in exports. Swap before DeepSpeed wraps the model, so its hooks see the
new module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchLinear(nn.Module):
    """Drop-in for a Conv3d with kernel == stride, no padding, dilation 1, one group. An input of
    exactly one kernel per item (how the patch embedding calls it) takes the matmul; any other shape
    takes the convolution, so the result never depends on the caller's shape."""

    def __init__(self, conv: nn.Conv3d):
        super().__init__()
        if not is_patch_conv(conv):
            raise ValueError(f"not a patchifying Conv3d (kernel {conv.kernel_size}, stride {conv.stride}, padding "
                             f"{conv.padding}, dilation {conv.dilation}, groups {conv.groups})")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.weight = conv.weight
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or tuple(x.shape[1:]) != (self.in_channels, *self.kernel_size):
            return F.conv3d(x, self.weight, self.bias, stride=self.stride)
        out = F.linear(x.reshape(x.shape[0], -1), self.weight.reshape(self.out_channels, -1), self.bias)
        return out.view(x.shape[0], self.out_channels, 1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size} (as a matmul)"


def is_patch_conv(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv3d) and tuple(module.kernel_size) == tuple(module.stride)
            and tuple(module.padding) == (0, 0, 0) and tuple(module.dilation) == (1, 1, 1) and module.groups == 1
            and module.padding_mode == "zeros")


def use_patch_matmul(model: nn.Module) -> int:
    """Replace every patchifying Conv3d in `model` by a PatchLinear on the same parameters; return how many."""
    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if is_patch_conv(child)]
    for parent, name in targets:
        setattr(parent, name, PatchLinear(getattr(parent, name)))
    return len(targets)
