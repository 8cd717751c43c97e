"""Differentiable structural similarity (Wang et al. 2004), for Metaformer's loss (eq. 7) and task trimming (eq. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metaad.components.scaling import scaled_window


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``size`` taps (Wang et al. 2004 use 11 taps, sigma 1.5)."""
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    window = torch.exp(-(coords**2) / (2 * sigma**2))
    return window / window.sum()


def _blur_valid(images: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable depthwise Gaussian filter without padding ('valid'), as in Wang et al.'s reference code."""
    channels = images.shape[1]
    size = window.numel()
    horizontal = window.view(1, 1, 1, size).expand(channels, 1, 1, size)
    vertical = window.view(1, 1, size, 1).expand(channels, 1, size, 1)
    return F.conv2d(F.conv2d(images, horizontal, groups=channels), vertical, groups=channels)


def ssim_map(
    x: torch.Tensor,
    y: torch.Tensor,
    window_size: int = 11,
    sigma: float = 1.5,
    data_range: float = 1.0,
) -> torch.Tensor:
    """Local SSIM of (B, C, H, W) images, (B, C, H - w + 1, W - w + 1); K1 = 0.01, K2 = 0.03.

    The window shrinks to the largest odd size that fits images smaller than ``window_size``.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"ssim expects two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    size = min(window_size, *x.shape[-2:])
    size -= 1 - size % 2
    window = gaussian_window(size, sigma, x.dtype).to(x.device)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mu_x = _blur_valid(x, window)
    mu_y = _blur_valid(y, window)
    var_x = _blur_valid(x * x, window) - mu_x**2
    var_y = _blur_valid(y * y, window) - mu_y**2
    cov = _blur_valid(x * y, window) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def ssim(
    x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5, data_range: float = 1.0
) -> torch.Tensor:
    """Mean SSIM per image, (B,)."""
    return ssim_map(x, y, window_size, sigma, data_range).flatten(1).mean(1)


def ssim_loss(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window_size: int = 11,
              sigma: float = 1.5) -> torch.Tensor:
    """The SSIM loss l_ssim of eq. (7): 1 - mean SSIM over the batch (0 for identical images)."""
    return 1.0 - ssim(x, y, window_size, sigma, data_range).mean()


def ssim_window_at(image_size: int, window_at_256: int = 11) -> tuple[int, float]:
    """Wang et al.'s window (11 taps, σ 1.5) as the papers use it at 256 px, scaled to ``image_size``: the
    taps (odd, at least 3) and σ in proportion."""
    window = max(3, scaled_window(window_at_256, image_size))
    return window, 1.5 * window / 11


def global_ssim(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Eq. (1): (4 mu_x mu_y sigma_xy + eps) / ((mu_x² + mu_y²)(sigma_x² + sigma_y²) + eps), per row.

    Statistics are taken over all but the first dimension of (B, ...) tensors; ``y`` broadcasts, so one
    centre can be compared with a whole group. Returns (B,), 1 for identical non-constant inputs.
    """
    x = x.flatten(1).double()
    y = y.flatten(1).double()
    mu_x, mu_y = x.mean(1), y.mean(1)
    var_x = x.var(1, unbiased=False)
    var_y = y.var(1, unbiased=False)
    cov = ((x - mu_x[:, None]) * (y - mu_y[:, None])).mean(1)
    return ((4 * mu_x * mu_y * cov + eps) / ((mu_x**2 + mu_y**2) * (var_x + var_y) + eps)).float()
