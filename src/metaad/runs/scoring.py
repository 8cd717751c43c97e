"""The one path from decoded images to scores and maps, under evaluation (``runs``), the Python API, the
predict writer and the HTTP service (``deploy``): batches at the run's size, or, for a tiled run
(:mod:`metaad.data.tiles`), each image cut into overlapping tiles that the model sees one batch of tiles at a
time, with the tiles' maps blended back into the image's."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metaad.data.tiles import Tiling
from metaad.types import AnomalyPrediction


class Scorer:
    """A fitted ``model`` scoring images of side ``image_size`` (inputs already at that size, in [0, 1]); with
    ``tiling``, each image through its tiles, ``batch_size`` tiles at a time."""

    def __init__(self, model: nn.Module, image_size: int, tiling: Tiling | None = None, batch_size: int = 16) -> None:
        self.model = model
        self.image_size = image_size
        self.tiling = tiling
        self.batch_size = batch_size

    @torch.no_grad()
    def predict(self, images: torch.Tensor, content: torch.Tensor | None = None) -> AnomalyPrediction:
        """Scores (B,) and maps (B, S, S) of a batch at the run's size, as CPU tensors (the model's ``predict``
        runs them on its own device and hands them back there: ``metaad.components.estimator``).

        ``content`` (B, 4): where letterboxed images lie in their squares (``metaad.data.transforms.letterbox``);
        each map is cut to it and stretched back over the square, the grid of a stretched image's mask."""
        if self.tiling is None:
            prediction = self.model.predict(images)
        else:
            scored = [self.predict_tiled(image, self.tiling) for image in images]
            prediction = AnomalyPrediction(torch.tensor([score for score, _ in scored]),
                                           torch.stack([torch.from_numpy(anomaly_map) for _, anomaly_map in scored]))
        if content is None:
            return prediction
        maps = prediction.maps.float()
        side = tuple(maps.shape[-2:])
        out = [anomaly_map if (h, w) == side else
               F.interpolate(anomaly_map[None, None, y : y + h, x : x + w], size=side, mode="bilinear")[0, 0]
               for anomaly_map, (y, x, h, w) in zip(maps, content.tolist(), strict=True)]
        return AnomalyPrediction(prediction.scores, torch.stack(out))

    def predict_at_sizes(
        self, images: torch.Tensor, sizes: Sequence[tuple[int, int]], content: torch.Tensor | None = None
    ) -> tuple[list[float], list[np.ndarray]]:
        """Scores and float32 maps of a batch at the run's size (``content``: as :meth:`predict`), each map
        resized to its image's (H, W)."""
        prediction = self.predict(images, content)
        maps = [resize_map(anomaly_map, size) for anomaly_map, size in zip(prediction.maps, sizes, strict=True)]
        return [float(score) for score in prediction.scores], maps

    @torch.no_grad()
    def predict_tiled(self, image: torch.Tensor, tiling: Tiling) -> tuple[float, np.ndarray]:
        """Score one (3, H, W) image through its tiles (each given to the model as it is: the model resizes to its
        own working size), averaging the tiles' maps where they overlap; the image score is the highest tile
        score, so it stays the model's own score."""
        height, width = image.shape[-2:]
        boxes = tiling.boxes(height, width)
        total = torch.zeros(height, width)
        count = torch.zeros(height, width)
        best = -math.inf
        for start in range(0, len(boxes), self.batch_size):
            chunk = boxes[start : start + self.batch_size]
            crops = torch.stack([image[:, y : y + h, x : x + w] for y, x, h, w in chunk])
            prediction = self.model.predict(crops)
            best = max(best, float(prediction.scores.max()))
            maps = prediction.maps.float()
            if tuple(maps.shape[-2:]) != tuple(crops.shape[-2:]):
                maps = F.interpolate(maps[:, None], size=crops.shape[-2:], mode="bilinear")[:, 0]
            for (y, x, h, w), tile_map in zip(chunk, maps, strict=True):
                total[y : y + h, x : x + w] += tile_map
                count[y : y + h, x : x + w] += 1
        return best, (total / count).numpy()


def resize_map(anomaly_map: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """An (h, w) map as float32 numpy at ``size`` (H, W), bilinear."""
    anomaly_map = anomaly_map.float()
    if tuple(anomaly_map.shape) != tuple(size):
        anomaly_map = F.interpolate(anomaly_map[None, None], size=size, mode="bilinear")[0, 0]
    return anomaly_map.numpy().astype(np.float32, copy=False)
