"""The one path from decoded images to scores and maps, under evaluation (``runs``), the Python API, the
predict writer and the HTTP service (``deploy``): batches at the run's size, or overlapping tiles of a large
image, each seen at the run's size, with maps brought back to the image's own size."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metaad.types import AnomalyPrediction


class Scorer:
    """A fitted ``model`` scoring images of side ``image_size`` (inputs already at that size, in [0, 1])."""

    def __init__(self, model: nn.Module, image_size: int) -> None:
        self.model = model
        self.image_size = image_size

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyPrediction:
        """Scores (B,) and maps (B, S, S) of a batch at the run's size, as CPU tensors (the model's ``predict``
        runs them on its own device and hands them back there: ``metaad.components.estimator``)."""
        return self.model.predict(images)

    def predict_at_sizes(
        self, images: torch.Tensor, sizes: Sequence[tuple[int, int]]
    ) -> tuple[list[float], list[np.ndarray]]:
        """Scores and float32 maps of a batch at the run's size, each map resized to its image's (H, W)."""
        prediction = self.predict(images)
        maps = [resize_map(anomaly_map, size) for anomaly_map, size in zip(prediction.maps, sizes, strict=True)]
        return [float(score) for score in prediction.scores], maps

    @torch.no_grad()
    def predict_tiled(
        self, image: torch.Tensor, tile: int, overlap: float = 0.25, batch_size: int = 16
    ) -> tuple[float, np.ndarray]:
        """Blend the maps of overlapping ``tile`` x ``tile`` crops of one (3, H, W) image (each resized to the
        run's size, ``batch_size`` crops at a time) by averaging where they overlap; the image score is the
        highest tile score, so it stays the model's own score."""
        check_tiling(tile, overlap)
        height, width = image.shape[-2:]
        tile_h, tile_w = min(tile, height), min(tile, width)
        boxes = [(y, x) for y in tile_starts(height, tile_h, overlap) for x in tile_starts(width, tile_w, overlap)]
        total = torch.zeros(height, width)
        count = torch.zeros(height, width)
        best = -math.inf
        side = self.image_size
        for start in range(0, len(boxes), batch_size):
            chunk = boxes[start : start + batch_size]
            crops = torch.stack([image[:, y : y + tile_h, x : x + tile_w] for y, x in chunk])
            crops = F.interpolate(crops, size=(side, side), mode="bilinear", antialias=True)
            prediction = self.predict(crops.clamp_(0, 1))
            best = max(best, float(prediction.scores.max()))
            maps = F.interpolate(prediction.maps.float()[:, None], size=(tile_h, tile_w), mode="bilinear")[:, 0]
            for (y, x), tile_map in zip(chunk, maps, strict=True):
                total[y : y + tile_h, x : x + tile_w] += tile_map
                count[y : y + tile_h, x : x + tile_w] += 1
        return best, (total / count).numpy()


def check_tiling(tile: int | None, overlap: float) -> None:
    if tile is not None and tile < 8:
        raise ValueError(f"tile must be at least 8 pixels, got {tile}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile_overlap must be in [0, 1), got {overlap}")


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length``, overlapping by at least ``overlap``."""
    if tile >= length:
        return [0]
    step = max(1, int(tile * (1.0 - overlap)))
    n = math.ceil((length - tile) / step) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def resize_map(anomaly_map: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """An (h, w) map as float32 numpy at ``size`` (H, W), bilinear."""
    anomaly_map = anomaly_map.float()
    if tuple(anomaly_map.shape) != tuple(size):
        anomaly_map = F.interpolate(anomaly_map[None, None], size=size, mode="bilinear")[0, 0]
    return anomaly_map.numpy().astype(np.float32, copy=False)
