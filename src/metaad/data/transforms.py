"""The papers' preprocessing: resize to 256x256, grayscale to 3 channels, ImageNet normalisation."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 256  # Metaformer §4, multi-scale patch paper §4: inputs resized to 256x256


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


def _to_l(image: Image.Image) -> Image.Image:
    """High-bit-depth grayscale (16-bit TIFF/PNG) to 8 bit, scaling by the full range of its type."""
    array = np.asarray(image).astype(np.float64)
    top = 65535.0 if array.max() > 255 else 255.0
    return Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), mode="L")


def normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of (..., 3, H, W) images in [0, 1]."""
    mean = images.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (images - mean) / std


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
