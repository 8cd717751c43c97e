"""Shared machinery: input checks and one sort of the scores, from which every curve is read exactly.

Each metric is a function of the counts of negatives and positives scoring at or above a threshold, so
sorting the negative scores once and the (usually far fewer) positive scores once gives every threshold:
the curves have a vertex at each distinct positive score, and between two of them only negatives cross
(a horizontal segment). Ties between equal scores step together, so a tie of positives and negatives is a
diagonal segment, as in scikit-learn's ``roc_curve`` and the MVTec AD reference evaluation code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike
from scipy import ndimage

Array = ArrayLike | torch.Tensor

_CHUNK = 1 << 22  # elements per chunk in the NaN scan and the AUROC sum (bounded temporary memory)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def to_numpy(x: Array, name: str) -> np.ndarray:
    """A numpy view of a tensor or array (no copy when possible)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}") from error


def as_scores(x: Array, name: str) -> np.ndarray:
    """Real-valued scores, NaN rejected; float arrays are kept in their own dtype (no float64 copy)."""
    array = to_numpy(x, name)
    if array.dtype.kind == "b" or array.dtype.kind in "iu":
        array = array.astype(np.float64)
    elif array.dtype.kind != "f":
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    flat = array.reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        if np.isnan(flat[start : start + _CHUNK]).any():
            bad = np.flatnonzero(np.isnan(flat))
            first = tuple(int(i) for i in np.unravel_index(bad[0], array.shape))
            raise ValueError(
                f"{name} contains {bad.size} NaN value(s) (first at index {first}); scores must be numbers"
            )
    return array


def as_labels(x: Array, name: str) -> np.ndarray:
    """Boolean labels: any non-zero value is positive (defective)."""
    array = to_numpy(x, name)
    if array.dtype.kind == "b":
        return array
    if array.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be numbers (0 good, non-zero defective), got dtype {array.dtype}")
    if array.dtype.kind == "f" and np.isnan(array).any():
        raise ValueError(f"{name} contains NaN; labels must be 0 (good) or non-zero (defective)")
    return array != 0


def as_pairs(labels: Array, scores: Array, label_name: str, score_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Flat boolean labels and flat scores of equal shape."""
    y = as_labels(labels, label_name)
    s = as_scores(scores, score_name)
    if y.shape != s.shape:
        raise ValueError(
            f"{label_name} shape {tuple(y.shape)} does not match {score_name} shape {tuple(s.shape)}"
        )
    return y.reshape(-1), s.reshape(-1)


def _as_stack(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 2:
        return array[None]
    if array.ndim == 4 and array.shape[1] == 1:
        return array[:, 0]
    if array.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W) or (N, 1, H, W), got shape {tuple(array.shape)}")
    return array


def as_masks_maps(masks: Array, maps: Array) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (N, H, W) masks and (N, H, W) maps; (H, W) and (N, 1, H, W) inputs are accepted."""
    m = _as_stack(as_labels(masks, "masks"), "masks")
    a = _as_stack(as_scores(maps, "maps"), "maps")
    if m.shape != a.shape:
        raise ValueError(f"masks shape {tuple(m.shape)} does not match maps shape {tuple(a.shape)}")
    return m, a


@dataclass(frozen=True)
class Ranking:
    """Scores split by class and sorted; everything a ROC, F1 or PRO curve needs.

    neg: negative scores, ascending. values: distinct positive scores, descending.
    pos_ge[j] / neg_ge[j] / neg_gt[j]: positives scoring >= values[j], negatives >= and > values[j].
    region_ge[j]: sum over positives >= values[j] of 1 / (size of their ground-truth component), only
    from :func:`rank_regions`.
    """

    neg: np.ndarray
    values: np.ndarray
    pos_ge: np.ndarray
    neg_ge: np.ndarray
    neg_gt: np.ndarray
    region_ge: np.ndarray | None = None
    n_regions: int = 0

    @property
    def n_neg(self) -> int:
        return int(self.neg.size)

    @property
    def n_pos(self) -> int:
        return int(self.pos_ge[-1]) if self.pos_ge.size else 0

    @classmethod
    def build(
        cls, neg: np.ndarray, pos: np.ndarray, region_weights: np.ndarray | None = None, n_regions: int = 0
    ) -> Ranking:
        """From ascending ``neg`` and ``pos`` (and, for PRO, the weights of ``pos`` in the same order)."""
        is_start = np.ones(pos.size, dtype=bool)
        np.not_equal(pos[1:], pos[:-1], out=is_start[1:])
        starts = np.flatnonzero(is_start)  # ascending index of the first copy of each distinct value
        del is_start
        ascending = pos[starts]
        below = np.searchsorted(neg, ascending, side="left")
        at_or_below = np.searchsorted(neg, ascending, side="right")
        region_ge = None
        if region_weights is not None:
            suffix = region_weights[::-1].copy()  # highest score first
            np.cumsum(suffix, out=suffix)  # suffix[k] = weight of the k + 1 highest-scoring positives
            region_ge = suffix[pos.size - 1 - starts[::-1]]
            if region_ge.size:
                region_ge[-1] = n_regions  # all pixels of all regions: exactly 1 per region, no rounding
        return cls(
            neg=neg,
            values=ascending[::-1],
            pos_ge=(pos.size - starts)[::-1],
            neg_ge=(neg.size - below)[::-1],
            neg_gt=(neg.size - at_or_below)[::-1],
            region_ge=region_ge,
            n_regions=n_regions,
        )


def rank(labels: np.ndarray, scores: np.ndarray) -> Ranking:
    """Ranking of flat boolean ``labels`` and flat ``scores``: two boolean selections and two sorts."""
    neg = scores[~labels]
    neg.sort()
    pos = scores[labels]
    pos.sort()
    return Ranking.build(neg, pos)


def _sort_carrying(pos: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort scores ascending, carrying uint32 ids along.

    float32 scores are packed with their id into one uint64 key (order-preserving float bits in the high
    half), so a plain sort replaces a much slower argsort plus two gathers; other dtypes use argsort.
    """
    if pos.dtype != np.float32:
        order = np.argsort(pos)
        return pos[order], ids[order]
    bits = pos.view(np.uint32)
    negative = bits >= np.uint32(1 << 31)
    key = np.where(negative, ~bits, bits | np.uint32(1 << 31)).astype(np.uint64)
    key <<= np.uint64(32)
    key |= ids
    key.sort()
    ids_sorted = (key & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    key >>= np.uint64(32)
    high = key.astype(np.uint32)
    del key
    was_negative = high < np.uint32(1 << 31)
    np.invert(high, out=high, where=was_negative)  # negative floats: undo the inversion
    np.bitwise_xor(high, np.uint32(1 << 31), out=high, where=~was_negative)  # others: drop the added bit
    return high.view(np.float32), ids_sorted


def rank_regions(masks: np.ndarray, maps: np.ndarray) -> Ranking:
    """Ranking of (N, H, W) masks/maps that also carries per-region weights for PRO.

    Components are 8-connected per image (scipy.ndimage.label with a 3x3 structure); each component of
    each image gets total weight 1, spread evenly over its pixels (MVTec AD reference evaluation).
    """
    pos_parts: list[np.ndarray] = []
    id_parts: list[np.ndarray] = []
    size_parts: list[np.ndarray] = []
    n_regions = 0
    for mask, amap in zip(masks, maps, strict=True):
        if not mask.any():
            continue
        labelled, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        component = labelled[mask]
        size_parts.append(np.bincount(component, minlength=n + 1)[1:])
        pos_parts.append(amap[mask])
        id_parts.append((component + (n_regions - 1)).astype(np.uint32))  # global id, from 0
        n_regions += n
    neg = maps.reshape(-1)[~masks.reshape(-1)]
    neg.sort()
    if not pos_parts:
        return Ranking.build(neg, neg[:0], np.zeros(0))
    if n_regions >= 2**32:
        raise ValueError(f"too many ground-truth components ({n_regions}) for uint32 ids")
    inverse_size = 1.0 / np.concatenate(size_parts)
    pos, ids = _sort_carrying(np.concatenate(pos_parts), np.concatenate(id_parts))
    del pos_parts, id_parts
    weights = inverse_size[ids]
    del ids
    return Ranking.build(neg, pos, weights, n_regions)


def auroc(ranking: Ranking) -> float:
    """Mann-Whitney AUROC: P(positive > negative) + 0.5 P(tie); equal to the trapezoid ROC area."""
    n_neg, n_pos = ranking.n_neg, ranking.n_pos
    if n_neg == 0 or n_pos == 0:
        raise ValueError("AUROC needs both classes")
    tied = np.diff(ranking.pos_ge, prepend=0)  # positives at each distinct value
    # Each positive at v beats the negatives below v and half of those tied with v (exact int64 sum).
    twice_wins = int(np.dot(tied, 2 * n_neg - ranking.neg_ge - ranking.neg_gt))
    return twice_wins / (2.0 * n_neg * n_pos)


def f1_max(ranking: Ranking) -> tuple[float, float]:
    """Best F1 over thresholds ``score >= t``; the optimum is at a positive score (ties: highest t)."""
    if ranking.n_pos == 0:
        raise ValueError("F1 needs at least one positive")
    tp = ranking.pos_ge.astype(np.float64)
    f1 = 2.0 * tp / (tp + ranking.neg_ge + ranking.n_pos)
    best = int(np.argmax(f1))
    return float(f1[best]), float(ranking.values[best])


def step_curve(
    ranking: Ranking, y_ge: np.ndarray, stop: int | None = None, with_thresholds: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Vertices (negatives above, y above, threshold) of the exact step curve, thresholds descending.

    Two vertices per distinct positive value v: the end of the horizontal run of negatives above v, then
    the step at v (vertical, or diagonal when negatives tie with v); plus (0, 0) and (n_neg, y_ge[-1]).
    ``stop`` keeps the first ``stop`` values only: the curve is then exact up to its vertex at values[stop-1].
    """
    values, neg_ge, neg_gt = ranking.values[:stop], ranking.neg_ge[:stop], ranking.neg_gt[:stop]
    y_ge = y_ge[:stop]
    m, n_neg = values.size, ranking.n_neg
    x = np.empty(2 * m + 2, dtype=np.float64)
    y = np.empty(2 * m + 2, dtype=np.float64)
    x[0], y[0] = 0.0, 0.0
    x[1:-1:2], x[2:-1:2] = neg_gt, neg_ge
    y[1], y[3:-1:2], y[2:-1:2] = 0.0, y_ge[:-1], y_ge
    x[-1], y[-1] = n_neg, y_ge[-1]
    t = None
    if with_thresholds:
        t = np.empty(2 * m + 2, dtype=np.float64)
        t[0] = np.inf
        # The lowest negative above v starts the horizontal run ending at v (or the vertex is a duplicate).
        t[1:-1:2] = ranking.neg[np.minimum(n_neg - neg_gt, n_neg - 1)] if n_neg else values
        t[2:-1:2] = values
        t[-1] = ranking.neg[0] if n_neg else values[-1]
    return simplify(x, y, t)


def simplify(
    x: np.ndarray, y: np.ndarray, t: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Drop repeated vertices and interior vertices of vertical or horizontal runs (area unchanged)."""
    keep = np.ones(x.size, dtype=bool)
    keep[1:] = (x[1:] != x[:-1]) | (y[1:] != y[:-1])
    if x.size > 2:
        # Among the unique vertices, an interior one between two vertical or two horizontal segments goes.
        index = np.flatnonzero(keep)
        flat_x, flat_y = np.diff(x[index]) == 0, np.diff(y[index]) == 0
        inner = (flat_x[:-1] & flat_x[1:]) | (flat_y[:-1] & flat_y[1:])
        keep[index[1:-1][inner]] = False
    return x[keep], y[keep], None if t is None else t[keep]


def truncate(x: np.ndarray, y: np.ndarray, x_max: float) -> tuple[np.ndarray, np.ndarray]:
    """The curve for x <= x_max, with a vertex interpolated exactly at x_max (x ascending, x[0] = 0)."""
    end = int(np.searchsorted(x, x_max, side="right"))
    if end == x.size or x[end - 1] == x_max:
        return x[:end], y[:end]
    fraction = (x_max - x[end - 1]) / (x[end] - x[end - 1])
    y_max = y[end - 1] + fraction * (y[end] - y[end - 1])
    return np.append(x[:end], x_max), np.append(y[:end], y_max)


def trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoid area under a polyline."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)
