"""Evaluation as in the papers: image AUROC, pixel AUROC, AU-PRO (FPR <= 0.3), F1-max, and their curves."""

from metaad.metrics.classification import f1_max, image_auroc, pixel_auroc, roc_curve
from metaad.metrics.pro import PRO_FPR_LIMIT, aupro, pro_curve
from metaad.metrics.summary import evaluate

__all__ = [
    "PRO_FPR_LIMIT",
    "aupro",
    "evaluate",
    "f1_max",
    "image_auroc",
    "pixel_auroc",
    "pro_curve",
    "roc_curve",
]
