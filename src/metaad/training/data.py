"""Training images held in memory for the loop: decoded once, indexed by the loop's seeded order."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, SequentialSampler

from metaad.data.batches import iter_image_batches


class TrainImages:
    """(N, 3, H, W) training images in [0, 1]; stored as uint8 when that loses nothing (8-bit photographs)."""

    def __init__(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"training images must be (N, 3, H, W), got shape {tuple(images.shape)}")
        if len(images) == 0:
            raise ValueError("training needs at least one defect-free image")
        if images.dtype != torch.uint8:
            images = images.float()
            if images.min() < 0 or images.max() > 1:
                raise ValueError(
                    f"training images must be RGB in [0, 1], got values in [{float(images.min()):.3g}, "
                    f"{float(images.max()):.3g}] (metaad no longer takes ImageNet-normalised input)"
                )
            as_bytes = (images * 255).round()
            if torch.equal(as_bytes / 255, images):
                images = as_bytes.to(torch.uint8)
        self.images = images

    @classmethod
    def from_data(cls, data: torch.Tensor | Dataset | DataLoader | Iterable[Any]) -> TrainImages:
        """From a tensor, a metaad data set (samples with an ``"image"``), a DataLoader or batches.

        A DataLoader's batches are taken as it yields them (its workers, its collation) unless it shuffles,
        samples or drops images: then its data set is read in index order, so that the images, and the
        training, are the same whatever loader wraps them.
        """
        if isinstance(data, TrainImages):
            return data
        if isinstance(data, torch.Tensor):
            return cls(data)
        if isinstance(data, DataLoader) and _reorders(data):  # the loop draws its own seeded order, not the loader's
            data = data.dataset
        if isinstance(data, Dataset) and hasattr(data, "__len__"):  # map-style: one sample at a time
            samples = [data[i] for i in range(len(data))]
            return cls(torch.stack([s["image"] if isinstance(s, dict) else s for s in samples]))
        return cls(torch.cat(list(iter_image_batches(data))))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        batch = self.images[index]
        return batch.float().div_(255) if batch.dtype == torch.uint8 else batch.clone()

    def batches(self, size: int = 64) -> Iterable[torch.Tensor]:
        """The images in order, ``size`` at a time, in [0, 1] (for one pass of statistics over them)."""
        return (self[index] for index in torch.arange(len(self)).split(size))


def _reorders(loader: DataLoader) -> bool:
    """Whether ``loader`` yields other images, or another order, than its map-style data set holds."""
    if isinstance(loader.dataset, IterableDataset):
        return False
    batches = loader.batch_sampler
    in_order = type(batches) is BatchSampler and type(batches.sampler) is SequentialSampler
    return not in_order or batches.drop_last
