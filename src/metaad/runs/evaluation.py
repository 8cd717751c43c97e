"""Run a fitted model over a data set (through :class:`~metaad.runs.scoring.Scorer`, the one predict path) and
compute the papers' metrics, and the accuracy at a run's threshold."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from metaad.data.tiles import Tiling
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
    categories: list[str] | None = None  # (N,) each image's category ("" where the data set has none)

    def subset(self, keep: np.ndarray) -> Predictions:
        """The predictions of the images where ``keep`` (a boolean (N,) array) is true; timings kept."""
        indices = np.flatnonzero(keep)
        return Predictions(
            [self.paths[i] for i in indices], self.labels[indices], [self.defects[i] for i in indices],
            self.scores[indices], self.maps[indices], self.masks[indices], self.ms_per_image,
            self.ms_per_image_end_to_end, None if self.has_masks is None else self.has_masks[indices],
            None if self.categories is None else [self.categories[i] for i in indices],
        )

    def by_category(self) -> dict[str, Predictions]:
        """The predictions of each category, in order of first appearance (empty without categories)."""
        names = list(dict.fromkeys(self.categories or []))
        if names in ([], [""]):
            return {}
        categories = np.asarray(self.categories)
        return {name: self.subset(categories == name) for name in names}


def predict_dataset(
    model: nn.Module, dataset: Dataset, batch_size: int = 16, progress: bool = True, desc: str = "predict",
    tiling: Tiling | None = None,
) -> Predictions:
    """Predict every sample of ``dataset`` (through its tiles with ``tiling``), timing the model alone and the
    whole loop (with decoding)."""
    scorer = Scorer(model, dataset.image_size, tiling, batch_size)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    paths, labels, defects, scores, maps, masks, has_masks, categories = [], [], [], [], [], [], [], []
    seconds = 0.0
    start = time.perf_counter()
    for batch in tqdm(loader, desc=desc, disable=not progress, unit="batch"):
        tic = time.perf_counter()
        prediction = scorer.predict(batch["image"], batch.get("content"))
        seconds += time.perf_counter() - tic
        paths += list(batch["path"])
        defects += list(batch["defect"])
        labels.append(batch["label"].numpy())
        scores.append(prediction.scores.float().numpy())
        maps.append(prediction.maps.float().numpy())
        masks.append((batch["mask"][:, 0] > 0.5).numpy().astype(np.uint8))
        has_masks.append(np.asarray(batch.get("has_mask", [True] * len(batch["path"])), bool))
        categories += list(batch.get("category", [""] * len(batch["path"])))
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
        categories,
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


CATEGORY_METRICS = ("image_auroc", "pixel_auroc", "pro")


def add_category_metrics(metrics: dict, predictions: Predictions, thresholds: dict) -> dict:
    """Under the unified protocol (images of several categories): ``metrics["per_category"]``, each category's
    metrics with the accuracy at its own threshold (``thresholds["categories"]``, else the global one), and
    ``metrics["category_mean"]``, the mean over categories of image AUROC, pixel AUROC and PRO (how the unified
    protocol is reported; the top-level metrics pool every image, across categories' score scales)."""
    groups = predictions.by_category()
    if len(groups) < 2:
        return metrics
    per_category = {}
    for name, group in groups.items():
        result = compute_metrics(group)
        add_threshold_outcome(result, group, category_thresholds(thresholds, name).get("threshold"))
        per_category[name] = result
    metrics["per_category"] = per_category
    means = {}
    for key in CATEGORY_METRICS:
        values = [r[key] for r in per_category.values() if isinstance(r.get(key), float)]
        if len(values) == len(per_category):
            means[key] = float(np.mean(values))
    if means:
        metrics["category_mean"] = means
    return metrics


def category_thresholds(thresholds: dict, category: str | None) -> dict:
    """The thresholds a category's images are decided with: its own where the run has them, else the run's
    global ones (a run of one category has only those)."""
    own = thresholds.get("categories", {}).get(category or "")
    return own if own is not None else thresholds


def image_thresholds(predictions: Predictions, thresholds: dict) -> np.ndarray | float | None:
    """Each image's decision threshold: its category's, or the global one for all (None: no threshold)."""
    if not thresholds.get("categories") or predictions.categories is None:
        return thresholds.get("threshold")
    values = [category_thresholds(thresholds, c).get("threshold") for c in predictions.categories]
    return None if any(v is None for v in values) else np.asarray(values, dtype=float)


def add_threshold_outcome(metrics: dict, predictions: Predictions, threshold: float | np.ndarray | None) -> dict:
    """``metrics`` with the accuracy of the decisions at ``threshold`` (one for all images, or one per image),
    and on a split of defect-free images only, how many of them the threshold flags."""
    if threshold is None:
        return metrics
    decided = predictions.scores > threshold
    metrics["accuracy_at_threshold"] = float(np.mean(decided == (predictions.labels == 1)))
    if "evaluation_skipped" in metrics and not predictions.labels.any():
        metrics["false_alarms_at_threshold"] = int(decided.sum())
        metrics["n_test_images"] = len(decided)
    return metrics
