"""Image decoding to the contract's input, RGB in [0, 1] (grayscale to 3 channels, resized), and the
intensity transforms methods share. Normalisation for a backbone belongs to the backbone (``metaad.backbones``)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# the ImageNet statistics, defined here once (metaad.backbones' per-backbone table refers to them)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 256  # Metaformer §4, multi-scale patch paper §4: inputs resized to 256x256
# the image files metaad reads, matched case-insensitively
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def pil_to_tensor(image: Image.Image, size: int | tuple[int, int] = DEFAULT_IMAGE_SIZE) -> torch.Tensor:
    """RGB float tensor in [0, 1], (3, H, W), resized with antialiasing. Grayscale becomes 3 channels."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB") if image.mode not in ("I;16", "I", "F") else _to_l(image)
    image = image.convert("RGB")
    if image.size != (hw[1], hw[0]):
        image = image.resize((hw[1], hw[0]), Image.BILINEAR, reducing_gap=None)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


RESIZES = ("stretch", "pad")
"""How an image becomes the run's square: ``stretch`` (each side to the size, the papers' way) or ``pad`` (the long
side to the size, the aspect kept, the rest of the square black: :func:`letterbox`)."""


def content_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a ``width`` x ``height`` image letterboxed into a ``size`` square: its long
    side fills the square, the short side is scaled alike (at least 1 px) and centred."""
    scale = size / max(width, height)
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    return (size - h) // 2, (size - w) // 2, h, w


def letterbox(image: Image.Image, size: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """(3, size, size) RGB in [0, 1] with the image's aspect kept (long side to ``size``, centred on black), and
    where the image lies in it (:func:`content_box`)."""
    box = content_box(*image.size, size)
    y, x, h, w = box
    canvas = torch.zeros(3, size, size)
    canvas[:, y : y + h, x : x + w] = pil_to_tensor(image, (h, w))
    return canvas, box


def _to_l(image: Image.Image) -> Image.Image:
    """High-bit-depth grayscale (16-bit TIFF/PNG) to 8 bit, scaling by the full range of its type."""
    array = np.asarray(image).astype(np.float64)
    top = 65535.0 if array.max() > 255 else 255.0
    return Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), mode="L")


def normalize(
    images: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> torch.Tensor:
    """(..., 3, H, W) images in [0, 1] normalised with per-channel ``mean`` and ``std`` (ImageNet's by default)."""
    return (images - images.new_tensor(mean).view(3, 1, 1)) / images.new_tensor(std).view(3, 1, 1)


def standardize_intensity(images: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Give every (B, 3, H, W) image in [0, 1] the ImageNet mean and spread of pixel values.

    Each image is shifted and scaled as a whole (one mean and one standard deviation over its pixels and
    channels, so colours keep their relations) to a mean of 0.449 and a standard deviation of 0.226 in [0, 1]
    units, the averages of the ImageNet statistics. This removes the exposure and
    contrast differences between shots of one product that a frozen backbone would otherwise see as
    different texture. A flat image becomes uniform grey.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) images, got shape {tuple(images.shape)}")
    pixels = images
    mean = pixels.mean(dim=(1, 2, 3), keepdim=True)
    std = pixels.std(dim=(1, 2, 3), keepdim=True).clamp_min(eps)
    target_mean, target_std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
    return (pixels - mean) / std * target_std + target_mean


# "auto" standardises above this exposure variation: set between metaad's evenly lit synthetic categories (0.05-0.06)
# and Magnetic Tile Defects (0.31) by PatchCore's validation (``benchmarks/NOTES.md``), not on a test label
EXPOSURE_VARIATION_LIMIT = 0.1


def standardizing(mode: str, variation: float) -> bool:
    """Whether ``standardize_images=mode`` ("auto", "always", "never") standardises, given the training images'
    measured ``variation`` (NaN before a fit: "auto" then does not)."""
    if mode == "auto":
        return bool(variation > EXPOSURE_VARIATION_LIMIT)
    return mode == "always"


def exposure_variation(batches: Iterable[torch.Tensor]) -> float:
    """Coefficient of variation (std / mean) of the images' mean brightness, for batches in [0, 1].

    0 when every image is equally bright; about 0.05 for metaad's synthetic categories, 0.31 for Magnetic
    Tile Defects' training images.
    """
    means = torch.cat([batch.mean(dim=(1, 2, 3)) for batch in batches])
    if means.numel() == 0:
        raise ValueError("exposure_variation needs at least one image")
    average = means.mean().item()
    return means.std(correction=0).item() / average if average > 1e-6 else 0.0


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`: back to [0, 1] RGB."""
    mean = images.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return images * std + mean


def mask_to_tensor(mask: Image.Image, size: int | tuple[int, int] = DEFAULT_IMAGE_SIZE) -> torch.Tensor:
    """Binary (1, H, W) float mask; any non-zero pixel is defect. Nearest-neighbour resize keeps it binary."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    array = np.asarray(mask.convert("L"), dtype=np.uint8) > 0
    tensor = torch.from_numpy(array).float()[None, None]
    if tuple(tensor.shape[-2:]) != hw:
        tensor = F.interpolate(tensor, size=hw, mode="nearest")
    return tensor[0]
