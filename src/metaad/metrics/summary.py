"""One call for the numbers the papers report: image AUROC / F1-max and pixel AUROC / PRO / F1-max."""

from __future__ import annotations

import math

from metaad.metrics._ranking import (
    Array,
    as_labels,
    as_masks_maps,
    as_scores,
    auroc,
    f1_max,
    rank_regions,
    trapezoid,
)
from metaad.metrics.classification import f1_max as image_f1_max
from metaad.metrics.classification import image_auroc
from metaad.metrics.pro import PRO_FPR_LIMIT, pro_curve_from_ranking


def evaluate(
    labels: Array,
    scores: Array,
    masks: Array | None = None,
    maps: Array | None = None,
    pro_fpr_limit: float = PRO_FPR_LIMIT,
) -> dict[str, float]:
    """Image metrics, and pixel metrics when ``masks`` and ``maps`` are given.

    Keys: ``image_auroc``, ``image_f1_max``; with masks/maps also ``pixel_auroc``, ``pro`` (AU-PRO up to
    FPR ``pro_fpr_limit``, 0.3 as in Metaformer §4.1) and ``pixel_f1_max``. When no mask has a defect
    pixel (or every pixel is defect) the pixel metrics are undefined and set to NaN. A single-class
    ``labels`` raises ValueError, since image AUROC is then undefined. Pixel metrics share one sort.
    """
    y, s = as_labels(labels, "labels"), as_scores(scores, "scores")
    result = {"image_auroc": image_auroc(y, s), "image_f1_max": image_f1_max(y, s)[0]}
    if masks is None and maps is None:
        return result
    if masks is None or maps is None:
        missing = "masks" if masks is None else "maps"
        raise ValueError(f"pixel metrics need both masks and maps; {missing} is None")
    m, a = as_masks_maps(masks, maps)
    if m.shape[0] != s.shape[0]:
        raise ValueError(f"masks/maps hold {m.shape[0]} images but labels/scores hold {s.shape[0]}")
    ranking = rank_regions(m, a)
    if ranking.n_pos == 0 or ranking.n_neg == 0:
        result.update(pixel_auroc=math.nan, pro=math.nan, pixel_f1_max=math.nan)
        return result
    fpr, pro = pro_curve_from_ranking(ranking, pro_fpr_limit)
    result["pixel_auroc"] = auroc(ranking)
    result["pro"] = trapezoid(fpr, pro) / pro_fpr_limit
    result["pixel_f1_max"] = f1_max(ranking)[0]
    return result
