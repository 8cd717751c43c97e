"""Turn what a user passes to ``fit`` / ``predict`` into batches of image tensors."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def iter_image_batches(data: torch.Tensor | Iterable, batch_size: int = 32) -> Iterator[torch.Tensor]:
    """Yield (B, 3, H, W) float tensors from a tensor, a DataLoader or any iterable of batches.

    A batch may be a tensor or a mapping with an ``"image"`` entry (what metaad datasets yield).
    """
    if isinstance(data, torch.Tensor):
        if data.ndim != 4:
            raise ValueError(f"expected images as a (N, C, H, W) tensor, got shape {tuple(data.shape)}")
        yield from data.split(batch_size)
        return
    for batch in data:
        images = batch["image"] if isinstance(batch, dict) else batch
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError(
                "each batch must be a (B, C, H, W) tensor or a dict with an 'image' tensor of that shape; "
                f"got {type(images).__name__}"
                + (f" of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else "")
            )
        yield images
