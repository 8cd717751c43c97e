"""What a method does to its input before its network, written once: resize to the method's working size,
exposure standardisation (a metaad addition, chosen by PatchCore's validation), and normalisation with the
backbone's statistics, in that order, for (B, 3, H, W) RGB images in [0, 1] (the contract's input)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metaad.data.transforms import exposure_variation, normalize, standardize_intensity, standardizing

STANDARDIZE_MODES = ("auto", "always", "never")


def resize(images: torch.Tensor, side: int | None) -> torch.Tensor:
    """``images`` as ``side`` × ``side`` (bilinear, antialiased), unchanged when they are already (or ``side``
    is None)."""
    if side is not None and images.shape[-2:] != (side, side):
        images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    return images


class Preprocess(nn.Module):
    """Resize → exposure standardisation → normalisation.

    Args:
        image_size: the side images are resized to (None: as given).
        standardize_images: None for a method without the option; else "auto", "always" or "never": give each
            image the ImageNet mean and spread of pixel values (``metaad.data.transforms.standardize_intensity``),
            which removes shot-to-shot exposure and contrast that a frozen backbone would see as texture. "auto"
            decides at fit (:meth:`measure`): it standardises when the training images' mean brightness varies
            by more than ``EXPOSURE_VARIATION_LIMIT`` (coefficient of variation, kept in the buffer
            ``exposure_variation``, NaN before a fit).
        normalization: the backbone's (mean, std) (``metaad.backbones.normalization``); None: none.
    """

    def __init__(
        self,
        image_size: int | None,
        standardize_images: str | None = None,
        normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    ) -> None:
        super().__init__()
        if standardize_images is not None:
            if standardize_images not in STANDARDIZE_MODES:
                raise ValueError(
                    f"standardize_images must be 'auto', 'always' or 'never', got {standardize_images!r}"
                )
            self.register_buffer("exposure_variation", torch.tensor(float("nan")))
        self.image_size = image_size
        self.standardize_images = standardize_images
        self.normalization = normalization

    @property
    def standardizing(self) -> bool:
        """Whether images are standardised (for "auto", decided by the last fit)."""
        if self.standardize_images is None:
            return False
        return standardizing(self.standardize_images, float(self.exposure_variation))

    def measure(self, batches: Iterable[torch.Tensor]) -> None:
        """At fit: the training images' exposure variation, which decides "auto" (other modes need none)."""
        if self.standardize_images == "auto":
            self.exposure_variation.fill_(exposure_variation(batches))

    def fit_summary(self) -> dict[str, Any]:
        """What :meth:`measure` decided (for a method's ``fit_summary``)."""
        if self.standardize_images is None:
            return {}
        return {"exposure_variation": float(self.exposure_variation), "standardizing": self.standardizing}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB (B, 3, H, W) images in [0, 1], got shape {tuple(images.shape)}")
        images = resize(images.float(), self.image_size)
        if self.standardizing:
            images = standardize_intensity(images)
        if self.normalization is not None:
            images = normalize(images, *self.normalization)
        return images
