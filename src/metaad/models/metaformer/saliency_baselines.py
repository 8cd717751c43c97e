"""Two training-free saliency baselines for the instance prior: a centre-bias Gaussian and spectral residual.

Both take (B, 3, H, W) RGB images in [0, 1], like the instance-prior generator, and return (B, 1, H, W) maps in
[0, 1], so that ``benchmarks/instance_prior.py`` scores all three the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaad.components.smoothing import gaussian_blur

_GRAY = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as in Matlab's rgb2gray


class CenterBiasGaussian(nn.Module):
    """An image-independent Gaussian centred on the image, peak 1; ``sigma`` is a fraction of each side."""

    def __init__(self, sigma: float = 0.25) -> None:
        super().__init__()
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.sigma = sigma

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        ys = (torch.arange(height, device=images.device, dtype=torch.float32) + 0.5) / height - 0.5
        xs = (torch.arange(width, device=images.device, dtype=torch.float32) + 0.5) / width - 0.5
        prior = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * self.sigma**2))
        return prior.expand(batch, 1, height, width).to(images.dtype)


class SpectralResidual(nn.Module):
    """Spectral residual saliency (Hou & Zhang, CVPR 2007), batched with ``torch.fft``.

    As in the authors' reference code: the gray image is resized to ``size`` px, the log amplitude spectrum
    minus its 3x3 local average (replicate padding) is recombined with the phase, the squared magnitude of
    the inverse transform is smoothed by a Gaussian (σ = ``blur_sigma`` px at ``size``), min-max normalised
    per image and resized back to the input size.
    """

    def __init__(self, size: int = 64, blur_sigma: float = 2.5) -> None:
        super().__init__()
        if size < 8 or blur_sigma <= 0:
            raise ValueError(f"expected size >= 8 and blur_sigma > 0, got size={size}, blur_sigma={blur_sigma}")
        self.size = size
        self.blur_sigma = blur_sigma

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        rgb = images.float().clamp(0, 1)
        gray = (rgb * rgb.new_tensor(_GRAY).view(1, 3, 1, 1)).sum(1, keepdim=True)
        small = F.interpolate(gray, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        spectrum = torch.fft.fft2(small)
        log_amplitude = torch.log(spectrum.abs().clamp_min(1e-8))
        local_mean = F.avg_pool2d(F.pad(log_amplitude, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        residual = torch.exp((log_amplitude - local_mean) + 1j * torch.angle(spectrum))
        saliency = torch.fft.ifft2(residual).abs() ** 2
        saliency = gaussian_blur(saliency, self.blur_sigma, truncate=2.0, padding="zeros")
        low = saliency.amin(dim=(2, 3), keepdim=True)
        high = saliency.amax(dim=(2, 3), keepdim=True)
        saliency = (saliency - low) / (high - low).clamp_min(1e-12)
        out = F.interpolate(saliency, size=(height, width), mode="bilinear", align_corners=False)
        return out.clamp(0, 1).to(images.dtype)

