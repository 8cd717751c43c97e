"""Run a fitted model over a data set and compute the papers' metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from metaad.metrics import evaluate


@dataclass
class Predictions:
    """Everything a model said about a data set, aligned by index."""

    paths: list[str]
    labels: np.ndarray  # (N,) 0 good, 1 defective
    defects: list[str]
    scores: np.ndarray  # (N,)
    maps: np.ndarray  # (N, H, W) float32
    masks: np.ndarray  # (N, H, W) uint8
    ms_per_image: float  # the model alone
    ms_per_image_end_to_end: float  # with image decoding and preprocessing


def predict_dataset(model: nn.Module, dataset: Dataset, batch_size: int = 16, progress: bool = True) -> Predictions:
    """Predict every sample of ``dataset``, timing the model alone and the whole loop (with decoding)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    paths, labels, defects, scores, maps, masks = [], [], [], [], [], []
    seconds = 0.0
    start = time.perf_counter()
    for batch in tqdm(loader, desc="predict", disable=not progress, unit="batch"):
        tic = time.perf_counter()
        prediction = model.predict(batch["image"])
        seconds += time.perf_counter() - tic
        paths += list(batch["path"])
        defects += list(batch["defect"])
        labels.append(batch["label"].numpy())
        scores.append(prediction.scores.float().numpy())
        maps.append(prediction.maps.float().numpy())
        masks.append((batch["mask"][:, 0] > 0.5).numpy().astype(np.uint8))
    n = len(paths)
    total = time.perf_counter() - start
    return Predictions(
        paths,
        np.concatenate(labels),
        defects,
        np.concatenate(scores),
        np.concatenate(maps),
        np.concatenate(masks),
        1000.0 * seconds / max(n, 1),
        1000.0 * total / max(n, 1),
    )


def compute_metrics(predictions: Predictions) -> dict[str, float]:
    """Image AUROC and F1-max; pixel AUROC, PRO (FPR <= 0.3) and pixel F1-max where masks exist."""
    has_masks = bool(predictions.masks.any())
    return evaluate(
        predictions.labels,
        predictions.scores,
        masks=predictions.masks if has_masks else None,
        maps=predictions.maps if has_masks else None,
    )
