"""ROC curve, AUROC (image and pixel level) and F1-max, exact with ties, memory-light on 65M pixels.

Image AUROC is the detection metric of Metaformer (ICCV 2021) Tables 1-2 and the multi-scale patch paper;
pixel AUROC and F1-max are the MVTec AD / MIAD localisation conventions. Labels: 0 good, non-zero defective;
higher scores mean more anomalous.
"""

from __future__ import annotations

import numpy as np

from metaad.metrics._ranking import (
    Array,
    Ranking,
    as_labels,
    as_masks_maps,
    as_pairs,
    as_scores,
    auroc,
    rank,
    step_curve,
)
from metaad.metrics._ranking import f1_max as _f1_max


def _check_two_classes(ranking: Ranking, what: str, unit: str) -> None:
    if ranking.n_pos == 0 or ranking.n_neg == 0:
        present = "defective (non-zero)" if ranking.n_pos else "good (0)"
        raise ValueError(
            f"{what} is undefined: every {unit} is {present}; it needs at least one good (0) and one "
            f"defective (non-zero) {unit}"
        )


def roc_curve(labels: Array, scores: Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr, thresholds)``, thresholds descending, first point (0, 0) at threshold inf.

    A point is "predict defective when score >= threshold". Repeated points and interior points of
    vertical/horizontal runs are dropped (the area is unchanged), so pixel-level curves stay plottable.
    Works on any shape (e.g. masks and maps); labels and scores must have the same shape.
    """
    y, s = as_pairs(labels, scores, "labels", "scores")
    ranking = rank(y, s)
    _check_two_classes(ranking, "ROC curve", "sample")
    fp, tp, thresholds = step_curve(ranking, ranking.pos_ge.astype(np.float64), with_thresholds=True)
    return fp / ranking.n_neg, tp / ranking.n_pos, thresholds


def image_auroc(labels: Array, scores: Array) -> float:
    """Area under the ROC curve of image scores (labels 0 good / non-zero defective), ties count 1/2.

    Equal to ``sklearn.metrics.roc_auc_score``; raises ValueError when only one class is present.
    """
    y = as_labels(labels, "labels")
    s = as_scores(scores, "scores")
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(
            f"image_auroc expects 1-D labels and scores of shape (N,), got labels shape {tuple(y.shape)} "
            f"and scores shape {tuple(s.shape)}"
        )
    if y.shape != s.shape:
        raise ValueError(f"labels shape {tuple(y.shape)} does not match scores shape {tuple(s.shape)}")
    ranking = rank(y, s)
    _check_two_classes(ranking, "image AUROC", "image")
    return auroc(ranking)


def pixel_auroc(masks: Array, maps: Array) -> float:
    """AUROC over all pixels of all images (masks (N, H, W), non-zero = defect; maps (N, H, W))."""
    m, a = as_masks_maps(masks, maps)
    ranking = rank(m.reshape(-1), a.reshape(-1))
    _check_two_classes(ranking, "pixel AUROC", "pixel")
    return auroc(ranking)


def f1_max(labels: Array, scores: Array) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold t achieving it (predict defective when score >= t).

    Image level: labels (N,), scores (N,). Pixel level: masks and maps of the same shape. When several
    thresholds reach the best F1, the highest is returned. Raises ValueError if there is no positive.
    """
    y, s = as_pairs(labels, scores, "labels", "scores")
    ranking = rank(y, s)
    if ranking.n_pos == 0:
        raise ValueError("F1-max is undefined: no sample is defective (non-zero label)")
    return _f1_max(ranking)
