"""Partial convolution (Liu et al., "Image Inpainting for Irregular Holes Using Partial Convolutions", ECCV 2018).

Each window is convolved over its visible pixels only and renormalised by the visible fraction,
``W·(X ⊙ M) · sum(1)/sum(M) + b`` where any pixel is visible and 0 elsewhere; the mask passed on is 1 wherever
the window saw a visible pixel (their eq. 1-2). Masked pixels never reach the output, whatever their value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PartialConv2d(nn.Conv2d):
    """A ``Conv2d`` with a (B, 1, H, W) visibility mask: ``forward(x, mask) -> (y, new_mask)``."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        ones = torch.ones(1, 1, *self.kernel_size, dtype=x.dtype, device=x.device)
        with torch.no_grad():
            visible = F.conv2d(mask, ones, None, self.stride, self.padding, self.dilation)
            new_mask = (visible > 0).to(x.dtype)
            ratio = self.kernel_size[0] * self.kernel_size[1] / visible.clamp(min=1.0) * new_mask
        raw = F.conv2d(x * mask, self.weight, None, self.stride, self.padding, self.dilation, self.groups)
        out = raw * ratio
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out * new_mask, new_mask


def masked_max_pool(x: torch.Tensor, mask: torch.Tensor, kernel: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Max pooling of features and mask alike (a window is visible if any of its pixels is; hidden features are 0
    after a partial convolution and its ReLU, so they never win against visible ones that are positive)."""
    return F.max_pool2d(x, kernel, stride), F.max_pool2d(mask, kernel, stride)
