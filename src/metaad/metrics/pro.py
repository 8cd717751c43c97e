"""Per-region overlap (PRO) curve and its normalised area up to a false-positive-rate limit.

Metaformer (ICCV 2021) §4.1 uses PRO (Bergmann et al.) integrated over FPR in [0, 0.3]. Definition as in
the MVTec AD reference evaluation: at threshold t, PRO(t) is the mean, over every 8-connected ground-truth
component of every image (each weighted equally), of the fraction of its pixels scoring >= t; FPR(t) is the
fraction of all ground-truth-negative pixels (good images included) scoring >= t. The curve is exact: it
has a vertex at every distinct score, computed from one sort of the scores and cumulative sums of
1 / component size, and is interpolated linearly exactly at the limit. AU-PRO = area / fpr_limit.
"""

from __future__ import annotations

import numpy as np

from metaad.metrics._ranking import (
    Array,
    Ranking,
    as_masks_maps,
    rank_regions,
    step_curve,
    trapezoid,
    truncate,
)

PRO_FPR_LIMIT = 0.3  # Metaformer §4.1: "false-positive rates within the range [0, 0.3]"


def _check_limit(fpr_limit: float) -> float:
    limit = float(fpr_limit)
    if not 0.0 < limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return limit


def pro_curve_from_ranking(ranking: Ranking, fpr_limit: float) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) up to ``fpr_limit`` from a :func:`rank_regions` ranking."""
    limit = _check_limit(fpr_limit)
    if ranking.n_regions == 0:
        raise ValueError("PRO is undefined: no image has a defect pixel in its mask")
    if ranking.n_neg == 0:
        raise ValueError("PRO is undefined: every pixel is defective, so there is no false-positive rate")
    # Values past the first whose FPR exceeds the limit cannot change the truncated curve.
    stop = int(np.searchsorted(ranking.neg_ge / ranking.n_neg, limit, side="right")) + 1
    fp, overlap, _ = step_curve(ranking, ranking.region_ge, stop=stop)
    fpr = fp / ranking.n_neg
    pro = np.minimum(overlap / ranking.n_regions, 1.0)  # the last sum may exceed 1 by rounding
    return truncate(fpr, pro, limit)


def pro_curve(masks: Array, maps: Array, fpr_limit: float = PRO_FPR_LIMIT) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve ``(fpr, pro)`` for FPR in [0, fpr_limit], FPR ascending, last point at the limit.

    masks: (N, H, W), non-zero = defect; maps: (N, H, W) anomaly scores. ``fpr_limit=1`` gives the whole
    curve. Interior points of vertical/horizontal runs are dropped (the area is unchanged).
    """
    m, a = as_masks_maps(masks, maps)
    return pro_curve_from_ranking(rank_regions(m, a), fpr_limit)


def aupro(masks: Array, maps: Array, fpr_limit: float = PRO_FPR_LIMIT) -> float:
    """Area under the PRO curve for FPR in [0, fpr_limit] (trapezoid), divided by ``fpr_limit``; in [0, 1]."""
    fpr, pro = pro_curve(masks, maps, fpr_limit)
    return trapezoid(fpr, pro) / _check_limit(fpr_limit)
