"""Run a fitted model over a data set (through :class:`~metaad.runs.scoring.Scorer`, the one predict path) and
compute the papers' metrics, and the accuracy at a run's threshold."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from metaad.metrics import evaluate
from metaad.runs.scoring import Scorer


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
    has_masks: np.ndarray | None = None  # (N,) bool: False for a defective image whose mask is unknown


def predict_dataset(
    model: nn.Module, dataset: Dataset, batch_size: int = 16, progress: bool = True, desc: str = "predict"
) -> Predictions:
    """Predict every sample of ``dataset``, timing the model alone and the whole loop (with decoding)."""
    scorer = Scorer(model, dataset.image_size)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    paths, labels, defects, scores, maps, masks, has_masks = [], [], [], [], [], [], []
    seconds = 0.0
    start = time.perf_counter()
    for batch in tqdm(loader, desc=desc, disable=not progress, unit="batch"):
        tic = time.perf_counter()
        prediction = scorer.predict(batch["image"])
        seconds += time.perf_counter() - tic
        paths += list(batch["path"])
        defects += list(batch["defect"])
        labels.append(batch["label"].numpy())
        scores.append(prediction.scores.float().numpy())
        maps.append(prediction.maps.float().numpy())
        masks.append((batch["mask"][:, 0] > 0.5).numpy().astype(np.uint8))
        has_masks.append(np.asarray(batch.get("has_mask", [True] * len(batch["path"])), bool))
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
        np.concatenate(has_masks),
    )


def compute_metrics(predictions: Predictions) -> dict:
    """Image AUROC and F1-max; pixel AUROC, PRO (FPR <= 0.3) and pixel F1-max where masks exist.

    What cannot be computed is said, not raised: with one class of images only, ``evaluation_skipped`` gives
    the reason and no metric is computed; when a defective image has no mask, ``pixel_metrics_skipped`` does.
    """
    labels = np.asarray(predictions.labels)
    n_good, n_defective = int(np.sum(labels == 0)), int(np.sum(labels == 1))
    if n_good == 0 or n_defective == 0:
        only = "defect-free" if n_defective == 0 else "defective"
        return {
            "evaluation_skipped": f"the test split holds {only} images only ({len(labels)}); image AUROC, "
            "F1-max and the pixel metrics need both defect-free and defective images",
        }
    skipped = pixel_metrics_skipped(predictions)
    result = evaluate(
        labels,
        predictions.scores,
        masks=None if skipped else predictions.masks,
        maps=None if skipped else predictions.maps,
    )
    if skipped:
        result["pixel_metrics_skipped"] = skipped
    return result


def pixel_metrics_skipped(predictions: Predictions) -> str | None:
    """Why pixel metrics cannot be computed for ``predictions``, or None when they can."""
    defective = np.asarray(predictions.labels) == 1
    if predictions.has_masks is not None and not np.all(predictions.has_masks[defective]):
        missing = int(np.sum(~predictions.has_masks[defective]))
        return (
            f"{missing} of {int(defective.sum())} defective test images have no ground-truth mask "
            "(image labels only, e.g. no ground_truth folder or no --mask-dir)"
        )
    if not predictions.masks.any():
        return "no ground-truth mask marks a defect pixel"
    return None


def add_threshold_outcome(metrics: dict, predictions: Predictions, threshold: float | None) -> dict:
    """``metrics`` with the accuracy of the decisions at ``threshold``, and on a split of defect-free images
    only, how many of them the threshold flags."""
    if threshold is None:
        return metrics
    decided = predictions.scores > threshold
    metrics["accuracy_at_threshold"] = float(np.mean(decided == (predictions.labels == 1)))
    if "evaluation_skipped" in metrics and not predictions.labels.any():
        metrics["false_alarms_at_threshold"] = int(decided.sum())
        metrics["n_test_images"] = len(decided)
    return metrics
