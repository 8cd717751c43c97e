"""Gaussian smoothing of anomaly and saliency maps, shared by the models."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0, padding: str = "reflect") -> torch.Tensor:
    """Separable Gaussian smoothing of (B, 1, H, W) maps with a kernel of radius ceil(truncate·σ).

    ``padding`` is "reflect" (the radius is capped below the map size) or "zeros" (Matlab ``imfilter``'s
    default). σ ≤ 0 returns the maps unchanged.
    """
    if sigma <= 0:
        return maps
    if padding not in ("reflect", "zeros"):
        raise ValueError(f"padding must be 'reflect' or 'zeros', got {padding!r}")
    radius = max(1, math.ceil(truncate * sigma))
    if padding == "reflect":
        radius = max(1, min(radius, maps.shape[-1] - 1, maps.shape[-2] - 1))
    offsets = torch.arange(-radius, radius + 1, device=maps.device, dtype=maps.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    if padding == "reflect":
        padded = F.pad(maps, (radius, radius, radius, radius), mode="reflect")
        return F.conv2d(F.conv2d(padded, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))
    rows = F.conv2d(maps, kernel.view(1, 1, 1, -1), padding=(0, radius))
    return F.conv2d(rows, kernel.view(1, 1, -1, 1), padding=(radius, 0))
